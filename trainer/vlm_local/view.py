"""What `vlmpretrain local` shows: the trainer's progress file rendered for a person.

The trainer's global rank 0 appends JSON lines to ``$VLM_PROGRESS_FILE`` (see
`vlm_trainer.progress` for the events). This module, which imports no torch, turns them
into

* a one-line progress bar per stage (rich) when the output is a terminal (steps, loss,
  tokens/s, measured image-token fraction, padding and samples per sequence when packed,
  ETA), redrawn in place, with eval, checkpoint and restart events printed above it;
* plain log lines otherwise (CI, ``| tee``), one every ~5% of the stage plus every
  eval/checkpoint/end event;
* a final summary table (per stage: status, steps, tokens trained and stated by the recipe,
  padding fraction and samples per sequence, final train loss, validation loss per modality,
  checkpoints written, wall time), drawn by rich on a terminal, plain columns otherwise.

:class:`ProgressTail` reads complete new lines of a growing file; :class:`StageState`
folds events into what the summary needs; :class:`StageView` draws. All three work on a
synthetic file, which is how they are tested.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections import deque
from typing import IO, Iterable

from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress
from rich.table import Table


# --------------------------------------------------------------------------- reading


class ProgressTail:
    """Reads the complete lines appended to a JSON-lines file since ``offset``.

    The file may not exist yet (the trainer creates it after start-up) and a line may be
    half written when read: only newline-terminated lines are returned, the rest waits
    for the next call. Lines that do not parse are skipped.
    """

    def __init__(self, path: str | os.PathLike, offset: int | None = None):
        self.path = str(path)
        if offset is None:
            offset = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        self.offset = offset
        self._partial = b""

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        if not chunk:
            return []
        self.offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()  # b"" when data ended with a newline
        out = []
        for raw in lines:
            raw = raw.strip()
            if not raw:
                continue
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if isinstance(obj, dict) and "event" in obj:
                out.append(obj)
        return out


def read_events(path: str | os.PathLike) -> list[dict]:
    """Every event of a progress file (all attempts), in order."""
    if not os.path.exists(path):
        return []
    return ProgressTail(path, offset=0).read()


# --------------------------------------------------------------------------- state


@dataclasses.dataclass
class StageState:
    """What is known about one stage of a local run, folded from progress events."""

    stage: str
    status: str = "pending"  # pending | running | completed | skipped | stopped | failed
    start_step: int | None = None  # step the (last) attempt started from: > 0 means resumed
    step: int = 0
    stop_at: int | None = None
    total_steps: int | None = None
    tokens: int = 0
    loss: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None
    image_ratio: float | None = None
    tokens_stated: int | None = None  # what the recipe states (tokens, else steps x globalBatchTokens)
    padding: float | None = None  # padding fraction of the last step
    samples_per_seq: float | None = None  # of the last step
    real_tokens: int = 0  # sums over the step events: padding and samples per sequence of the stage
    positions: int = 0
    samples: int = 0
    sequences: int = 0
    val: dict[str, float] = dataclasses.field(default_factory=dict)
    val_step: int | None = None
    checkpoints: list[int] = dataclasses.field(default_factory=list)  # steps checkpointed in this invocation
    final_checkpoint: str | None = None
    world_size: int | None = None
    metrics_port: int | None = None
    restarts: int = 0
    attempts: int = 0
    wall_s: float = 0.0
    init_from: str | None = None
    note: str = ""
    error: str | None = None
    _recent_losses: deque = dataclasses.field(default_factory=lambda: deque(maxlen=10), repr=False)
    _step_times: deque = dataclasses.field(default_factory=lambda: deque(maxlen=30), repr=False)

    @property
    def target(self) -> int | None:
        return self.stop_at or self.total_steps

    @property
    def padding_fraction(self) -> float | None:
        """Padding / positions computed over the stage's steps (None: not reported)."""
        return 1.0 - self.real_tokens / self.positions if self.positions else None

    @property
    def samples_per_sequence(self) -> float | None:
        return self.samples / self.sequences if self.sequences else None

    @property
    def train_loss(self) -> float | None:
        """Mean loss of the last (up to) 10 steps: one step's loss is noisy."""
        vals = [v for v in self._recent_losses if v is not None and math.isfinite(v)]
        if vals:
            return sum(vals) / len(vals)
        return self.loss

    def eta_seconds(self) -> float | None:
        target = self.target
        if target is None or len(self._step_times) < 2:
            return None
        (s0, t0), (s1, t1) = self._step_times[0], self._step_times[-1]
        if s1 <= s0 or t1 <= t0:
            return None
        return max(0.0, (target - self.step) * (t1 - t0) / (s1 - s0))

    def apply(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == "start":
            self.status = "running"
            self.attempts += 1
            self.start_step = int(ev.get("step") or 0)
            self.step = self.start_step
            self.total_steps = ev.get("total_steps", self.total_steps)
            self.stop_at = ev.get("stop_at", self.stop_at)
            self.world_size = ev.get("world_size", self.world_size)
            self.metrics_port = ev.get("metrics_port", self.metrics_port)
            self.restarts = max(self.restarts, int(ev.get("restart_count") or 0))
            self.tokens_stated = ev.get("tokens_stated", self.tokens_stated)
            self._step_times.clear()
        elif kind == "step":
            self.status = "running"
            self.step = int(ev.get("step", self.step))
            self.total_steps = ev.get("total_steps", self.total_steps)
            self.tokens = int(ev.get("tokens", self.tokens) or 0)
            loss = ev.get("loss")
            self.loss = loss
            self._recent_losses.append(loss)
            self.lr = ev.get("lr", self.lr)
            self.tokens_per_s = ev.get("tokens_per_s", self.tokens_per_s)
            self.image_ratio = ev.get("image_token_ratio", self.image_ratio)
            self.padding = ev.get("padding_fraction", self.padding)
            self.samples_per_seq = ev.get("samples_per_sequence", self.samples_per_seq)
            if ev.get("positions"):
                self.real_tokens += int(ev.get("text_tokens") or 0) + int(ev.get("image_tokens") or 0)
                self.positions += int(ev["positions"])
                self.samples += int(ev.get("samples") or 0)
                self.sequences += int(ev.get("sequences") or 0)
            self._step_times.append((self.step, float(ev.get("time", time.time()))))
        elif kind == "eval":
            self.val = {k: v for k, v in (ev.get("losses") or {}).items() if v is not None}
            self.val_step = ev.get("step")
        elif kind == "checkpoint":
            step = ev.get("step")
            if isinstance(step, int) and _checkpoint_committed(ev) and step not in self.checkpoints:
                self.checkpoints.append(step)
            if ev.get("final") and _checkpoint_committed(ev):
                self.final_checkpoint = ev.get("uri")
        elif kind == "end":
            status = ev.get("status") or "failed"
            self.status = status if status in ("completed", "stopped", "failed") else "failed"
            self.step = int(ev.get("step", self.step) or 0)
            self.tokens = int(ev.get("tokens", self.tokens) or 0)
            if ev.get("loss") is not None and not self._recent_losses:
                self.loss = ev["loss"]
            if ev.get("eval"):
                self.val = {k: v for k, v in ev["eval"].items() if v is not None}
            if ev.get("error"):
                self.error = ev["error"]


def _checkpoint_committed(ev: dict) -> bool:
    # The checkpoint manager may report saves that are not committed yet or failed.
    if ev.get("committed") is False or ev.get("error"):
        return False
    return ev.get("status", "committed") in ("committed", "saved", "ok")


def state_from_file(stage: str, path: str | os.PathLike) -> StageState:
    """The stage's state as recorded by earlier invocations (for a skipped stage)."""
    st = StageState(stage)
    for ev in read_events(path):
        st.apply(ev)
    st.checkpoints = []  # checkpoints written by *this* invocation only
    return st


# --------------------------------------------------------------------------- formatting


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "--:--"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def fmt_count(n: float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.1f}{suffix}"
    return f"{n:.0f}"


def fmt_loss(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.3f}"


# --------------------------------------------------------------------------- drawing


class StageView:
    """Draws one stage's progress to ``out``: a bar on a terminal, log lines elsewhere."""

    def __init__(self, state: StageState, out: IO[str] | None = None, *, mode: str = "auto",
                 min_interval: float = 0.1, plain_every_s: float = 15.0):
        self.state = state
        self.out = out or sys.stdout
        self.mode = resolve_mode(mode, self.out)
        # rich draws the bar; `--progress bar` draws it even when the output is not a terminal
        self._console = Console(file=self.out, force_terminal=True) if self.mode == "bar" else None
        self._progress: Progress | None = None
        self._task = None
        self.min_interval = min_interval
        self.plain_every_s = plain_every_s
        self._last_draw = 0.0
        self._last_plain_step: int | None = None
        self._last_plain_time = 0.0

    # ---- events
    def feed(self, events: Iterable[dict]) -> None:
        for ev in events:
            self.state.apply(ev)
            self._on_event(ev)
        if self.mode == "bar":
            self.draw()

    def _on_event(self, ev: dict) -> None:
        st, kind = self.state, ev.get("event")
        if kind == "start":
            where = f"resuming at step {st.start_step}" if st.start_step else "starting"
            extra = f", restart {st.restarts}" if st.restarts else ""
            port = f", metrics on :{st.metrics_port}" if st.metrics_port else ""
            self.message(f"{where}: {st.target} steps, world size {st.world_size}{extra}{port}")
        elif kind == "step" and self.mode == "plain":
            step, target = st.step, st.target or 0
            every = max(1, round(target / 20)) if target else 10
            now = time.monotonic()
            due = (self._last_plain_step is None or step % every == 0
                   or now - self._last_plain_time >= self.plain_every_s or step == target)
            if due:
                self._last_plain_step, self._last_plain_time = step, now
                self.message(self.status_text())
        elif kind == "eval":
            losses = " ".join(f"{m} {fmt_loss(v)}" for m, v in sorted((ev.get("losses") or {}).items()))
            self.message(f"validation at step {ev.get('step')}: {losses}")
        elif kind == "checkpoint":
            what = "final checkpoint" if ev.get("final") else "checkpoint"
            ok = _checkpoint_committed(ev)
            where = ev.get("uri") or ""
            state = "committed" if ok else f"NOT committed ({ev.get('error') or ev.get('status')})"
            self.message(f"{what} step {ev.get('step')} {state} {where}".rstrip())
        elif kind == "checkpoint_failed":
            self.message(f"checkpoint step {ev.get('step')} FAILED ({ev.get('phase')}): {ev.get('error')}; "
                         "training goes on")
        elif kind == "restore":
            src = "resumed" if ev.get("mode") == "resume" else "initialised"
            self.message(f"{src} from {ev.get('uri')} (step {ev.get('step')})")
        elif kind == "prune":
            before, after = ev.get("val_loss_before") or {}, ev.get("val_loss_after") or {}
            losses = "; ".join(f"{m} {fmt_loss(before.get(m))} -> {fmt_loss(after.get(m))}" for m in sorted(after))
            self.message(f"pruned layers {ev.get('removed')}: depth {ev.get('depth_before')} -> {ev.get('depth_after')}"
                         + (f"; validation loss {losses}" if losses else "") + f"; {ev.get('uri')}")
        elif kind == "end":
            status = ev.get("status")
            detail = f": {ev['error']}" if ev.get("error") else ""
            self.message(f"{status} at step {ev.get('step')}/{st.target} "
                         f"(loss {fmt_loss(st.train_loss)}){detail}")

    # ---- output
    def message(self, text: str) -> None:
        """A line above the bar (or a plain log line)."""
        line = f"[{self.state.stage}] {text}"
        if self._console is None:
            self.out.write(line + "\n")
            self.out.flush()
            return
        self._console.print(line, markup=False, highlight=False, soft_wrap=True)
        self.draw(force=True)

    def status_text(self) -> str:
        st = self.state
        target = st.target
        pct = f" ({100 * st.step / target:.0f}%)" if target else ""
        parts = [f"step {st.step}/{target or '?'}{pct}", f"loss {fmt_loss(st.loss)}",
                 f"{fmt_count(st.tokens_per_s)} tok/s",
                 f"img {100 * st.image_ratio:.1f}%" if st.image_ratio is not None else "img -"]
        parts += [_packing_text(st)] if st.padding is not None else []
        parts += [f"eta {fmt_duration(st.eta_seconds())}"]
        return " | ".join(parts)

    def bar_detail(self) -> str:
        """What the bar shows right of itself (the stage name and percentage go left)."""
        st = self.state
        return (f"{st.step}/{st.target or '?'} | loss {fmt_loss(st.loss)} | {fmt_count(st.tokens_per_s)} tok/s"
                f" | img {100 * (st.image_ratio or 0):.1f}%"
                + (f" | {_packing_text(st)}" if st.padding is not None else "")
                + f" | eta {fmt_duration(st.eta_seconds())}")

    def draw(self, force: bool = False) -> None:
        if self._console is None or self.state.status == "pending":
            return
        now = time.monotonic()
        if not force and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        if self._progress is None:
            # Redrawn only here (no refresh thread): the display changes when events arrive.
            self._progress = Progress("{task.description}", "{task.percentage:>3.0f}%", BarColumn(bar_width=None),
                                      "{task.fields[detail]}", console=self._console, auto_refresh=False,
                                      redirect_stdout=False, redirect_stderr=False)
            self._task = self._progress.add_task(self.state.stage, detail="")
            self._progress.start()
        st = self.state
        self._progress.update(self._task, completed=st.step, total=st.target, detail=self.bar_detail())
        self._progress.refresh()

    def close(self) -> None:
        """Leave the last bar on screen and move to a new line."""
        self.draw(force=True)
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _packing_text(st: StageState) -> str:
    per_seq = f" | {st.samples_per_seq:.1f}/seq" if st.samples_per_seq is not None else ""
    return f"pad {100 * st.padding:.1f}%{per_seq}"


def resolve_mode(mode: str, out) -> str:
    """``bar`` or ``plain`` for ``--progress auto|bar|plain`` on output ``out``."""
    if mode != "auto":
        return mode
    return "bar" if _isatty(out) else "plain"


def _isatty(out) -> bool:
    try:
        return bool(out.isatty()) and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


# --------------------------------------------------------------------------- summary


def summary_rows(states: list[StageState]) -> tuple[list[str], list[list[str]]]:
    modalities = sorted({m for st in states for m in st.val})
    stated = any(st.tokens_stated for st in states)
    packed = any(st.positions for st in states)
    header = (["stage", "status", "steps", "tokens"] + (["stated"] if stated else [])
              + (["padding", "samples/seq"] if packed else []) + ["train loss"]
              + [f"val {m}" for m in modalities] + ["ckpts", "wall"])
    rows = []
    for st in states:
        target = st.target
        steps = f"{st.step}/{target}" if target else str(st.step)
        if st.start_step:
            steps += f" (from {st.start_step})"
        ckpts = ",".join(str(s) for s in st.checkpoints) if st.checkpoints else "-"
        pad, per_seq = st.padding_fraction, st.samples_per_sequence
        rows.append([st.stage, st.status, steps, fmt_count(st.tokens)]
                    + ([fmt_count(st.tokens_stated) if st.tokens_stated else "-"] if stated else [])
                    + ([f"{100 * pad:.1f}%" if pad is not None else "-",
                        f"{per_seq:.2f}" if per_seq is not None else "-"] if packed else [])
                    + [fmt_loss(st.train_loss)]
                    + [fmt_loss(st.val.get(m)) for m in modalities]
                    + [ckpts, fmt_duration(st.wall_s) if st.status != "skipped" else "-"])
    return header, rows


def render_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def summary_table(states: list[StageState]) -> str:
    return render_table(*summary_rows(states))


def write_summary(states: list[StageState], out: IO[str], mode: str = "auto") -> None:
    """The summary table: drawn by rich where the progress is a bar, plain text otherwise."""
    if resolve_mode(mode, out) == "plain":
        out.write(summary_table(states) + "\n")
        out.flush()
        return
    header, rows = summary_rows(states)
    table = Table(box=box.SIMPLE_HEAD, header_style="bold")
    for name in header:
        table.add_column(name, no_wrap=True)
    for row in rows:
        table.add_row(*row)
    console = Console(file=out, force_terminal=True)
    # never truncate a cell: wider than the terminal, it wraps there like the plain table
    natural = console.measure(table, options=console.options.update_width(10_000)).maximum
    console.width = max(console.width, natural)
    console.print(table)


def summary_dict(states: list[StageState]) -> list[dict]:
    """The summary as data (written to ``<run-dir>/summary.json``)."""
    out = []
    for st in states:
        out.append({
            "stage": st.stage, "status": st.status, "step": st.step, "target_steps": st.target,
            "total_steps": st.total_steps, "resumed_from_step": st.start_step or 0, "tokens": st.tokens,
            "tokens_stated": st.tokens_stated, "padding_fraction": st.padding_fraction,
            "samples_per_sequence": st.samples_per_sequence,
            "train_loss": st.train_loss, "validation_loss": dict(st.val), "validation_step": st.val_step,
            "checkpoints_written": list(st.checkpoints), "final_checkpoint": st.final_checkpoint,
            "init_from": st.init_from, "attempts": st.attempts, "restarts": st.restarts,
            "world_size": st.world_size, "wall_seconds": round(st.wall_s, 1), "note": st.note,
            "error": st.error,
        })
    return out
