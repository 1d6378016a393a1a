-- Argo CD health check for dchat.network/DchatCluster.
--
-- Install it in the argocd-cm ConfigMap under the key
--   resource.customizations.health.dchat.network_DchatCluster
-- (see docs/rollouts.md, "Argo CD"). It reads only what dchat-operator writes to
-- status: phase, observedGeneration, the Ready/Progressing/Degraded/Paused/Hibernated
-- conditions and status.rollout.message. Tested by operator/tests/rollout_argocd_health.rs.
--
--   Paused=True (whatever the generation)    -> Suspended   (who paused it, how to resume)
--   Running + Ready=True                     -> Healthy
--   Pending, Provisioning, Progressing       -> Progressing (rollout step message; waking)
--   AwaitingPromotion                        -> Suspended   (waiting for dchat.network/promote)
--   Hibernating                              -> Suspended   (relays at zero by request)
--   RolledBack, Degraded, Failed             -> Degraded    (why, from the Degraded condition;
--                                               includes a failed embedded-store handover)
--   status older than the spec (generation)  -> Progressing
local hs = {}

local function condition(status, wanted)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == wanted then
      return c
    end
  end
  return nil
end

local function message_of(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for dchat-operator to report status"
  return hs
end

local st = obj.status

-- A paused cluster does not act on a newer spec: that is the pause, not progress.
local paused = condition(st, "Paused")
if paused ~= nil and paused.status == "True" then
  hs.status = "Suspended"
  hs.message = message_of(paused, "Reconciliation paused")
  return hs
end

local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and st.observedGeneration ~= nil and st.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for dchat-operator to observe generation " .. tostring(generation)
  return hs
end

local rollout_message = nil
if st.rollout ~= nil then
  rollout_message = st.rollout.message
end
local phase = st.phase

if phase == "AwaitingPromotion" then
  hs.status = "Suspended"
  hs.message = rollout_message or "Validated; waiting for the dchat.network/promote annotation"
  return hs
end

if phase == "Hibernating" then
  hs.status = "Suspended"
  hs.message = message_of(condition(st, "Hibernated"), "Hibernating")
  return hs
end

if phase == "RolledBack" or phase == "Degraded" or phase == "Failed" then
  hs.status = "Degraded"
  hs.message = message_of(condition(st, "Degraded"), rollout_message or phase)
  return hs
end

if phase == "Pending" or phase == "Provisioning" or phase == "Progressing" then
  hs.status = "Progressing"
  hs.message = message_of(condition(st, "Progressing"), rollout_message or phase)
  return hs
end

if phase == "Running" then
  local ready = condition(st, "Ready")
  if ready ~= nil and ready.status == "True" then
    hs.status = "Healthy"
  else
    hs.status = "Progressing"
  end
  hs.message = message_of(ready, "Running")
  return hs
end

hs.status = "Unknown"
hs.message = "Unknown phase " .. tostring(phase)
return hs
