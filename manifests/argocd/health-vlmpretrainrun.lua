-- Argo CD health check for pretrain.vlm.dev/VLMPretrainRun.
-- Install under argocd-cm `resource.customizations.health.pretrain.vlm.dev_VLMPretrainRun`
-- (see manifests/README.md). Reads only status (the operator never writes spec).
--
--   status.phase   Argo CD health
--   (none yet)     Progressing   the operator has not reconciled the run yet
--   Pending        Progressing   jobs being created / waiting for nodes
--   Running        Progressing   training (Degraded if condition Degraded=True)
--   Succeeded      Healthy       all stages finished
--   Suspended      Suspended     spec.suspend is true; the job was scaled to zero
--   Failed         Degraded      retries exhausted
--   Invalid        Degraded      the spec was rejected (see the Invalid condition / Events)
--
-- A status written for an older generation is reported as Progressing, so a sync
-- that changed spec (e.g. resources.nodes) is not Healthy before the operator saw it.
local hs = {}

local function condition(status, ctype)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

local function text(c, fallback)
  if c ~= nil then
    if c.message ~= nil and c.message ~= "" then
      return c.message
    end
    if c.reason ~= nil and c.reason ~= "" then
      return c.reason
    end
  end
  return fallback
end

local status = obj.status
if status == nil or status.phase == nil or status.phase == "" then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile the run"
  return hs
end

local phase = status.phase
local stage = status.stage or ""
local step = status.step
local where = ""
if stage ~= "" then
  where = " (stage " .. stage
  if step ~= nil then
    where = where .. ", step " .. tostring(step)
  end
  where = where .. ")"
end

local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation
    and phase ~= "Succeeded" and phase ~= "Failed" then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local degraded = condition(status, "Degraded")

if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "All stages finished" .. where
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = text(degraded, "Run failed") .. where
elseif phase == "Invalid" then
  hs.status = "Degraded"
  hs.message = text(condition(status, "Invalid") or degraded or condition(status, "Ready"), "The spec is invalid")
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = "Run suspended" .. where
elseif phase == "Running" or phase == "Pending" then
  if degraded ~= nil and degraded.status == "True" then
    hs.status = "Degraded"
    hs.message = text(degraded, "Run degraded") .. where
  else
    hs.status = "Progressing"
    hs.message = phase .. where
  end
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. tostring(phase)
end
return hs
