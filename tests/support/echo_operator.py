"""A tiny test-only kopf operator: proves kopf's finalizer/create/delete cycle against the emulator.

Its handlers live in their own registry, so they never leak into other tests' operators
(pass `registry=echo_operator.registry` to KopfRunner). The server URL comes from
$ECHO_OPERATOR_SERVER.
"""
import os

import kopf

registry = kopf.OperatorRegistry()
RESOURCE = ('pretrain.vlm.dev', 'v1alpha1', 'vlmpretrainruns')


@kopf.on.startup(registry=registry)
def configure(settings: kopf.OperatorSettings, **_):
    settings.networking.request_timeout = 10
    settings.watching.connect_timeout = 5


@kopf.on.login(registry=registry)
def login(**_):
    return kopf.ConnectionInfo(server=os.environ['ECHO_OPERATOR_SERVER'])


@kopf.on.create(*RESOURCE, registry=registry)
async def echo(body, spec, patch, **_):
    patch.status['phase'] = 'Echoed'
    patch.status['echo'] = dict(spec)
    kopf.info(body, reason='Echoed', message='echoed the spec')  # a v1 Event with generateName


@kopf.on.delete(*RESOURCE, registry=registry)  # a deletion handler makes kopf add its finalizer
async def goodbye(**_):
    pass
