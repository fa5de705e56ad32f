-- flaircad lab: push every stable MR series to flaircad with DICOMweb STOW-RS
-- (the "flaircad" entry of DicomWeb.Servers in orthanc.json).
--
-- flaircad's own results must never go back to it: its Grad-CAM series is a Secondary Capture
-- and its report an SR (neither is MR), and both carry SeriesDescriptions that start with
-- "flaircad"; either test alone stops the loop, both are kept in case a PACS rewrites one.
-- flaircad itself refuses what is not FLAIR (not_flair), so no FLAIR filter is needed here.

local SERVER = "flaircad"

function OnStableSeries(seriesId, tags, metadata)
   local modality = tags["Modality"] or ""
   local description = tags["SeriesDescription"] or ""
   if modality ~= "MR" then
      return
   end
   if string.lower(string.sub(description, 1, 8)) == "flaircad" then
      return
   end
   local body = DumpJson({ Resources = { seriesId }, Synchronous = false }, true)
   -- builtin = false: the route belongs to the DICOMweb plugin, not to Orthanc's core API
   RestApiPost("/dicom-web/servers/" .. SERVER .. "/stow", body, false)
   print("flaircad: queued STOW-RS of series " .. seriesId .. " (" .. description .. ")")
end
