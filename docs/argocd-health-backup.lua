-- Argo CD health check for dchat.network/DchatBackup.
--
-- Install it in the argocd-cm ConfigMap under the key
--   resource.customizations.health.dchat.network_DchatBackup
-- (see docs/backup.md, "Argo CD"). It reads status.phase and status.error, which
-- dchat-operator writes. Tested by operator/tests/backup_argocd_health.rs.
--
--   Completed                  -> Healthy
--   no status, Pending, Running -> Progressing
--   Failed                     -> Degraded (status.error)
local hs = {}
local st = obj.status
if st == nil or st.phase == nil or st.phase == "Pending" then
  hs.status = "Progressing"
  hs.message = "Waiting to start"
  return hs
end
if st.phase == "Running" then
  hs.status = "Progressing"
  hs.message = "Backup Job " .. tostring(st.jobName or "") .. " runs"
  return hs
end
if st.phase == "Completed" then
  hs.status = "Healthy"
  hs.message = "Completed: " .. tostring(st.sizeBytes or 0) .. " bytes at " .. tostring(st.location or "")
  return hs
end
if st.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = st.error or "Failed"
  return hs
end
hs.status = "Unknown"
hs.message = "Unknown phase " .. tostring(st.phase)
return hs
