-- flaircad lab: push every stable MR series to flaircad with DICOMweb STOW-RS
-- (the "flaircad" entry of DicomWeb.Servers in orthanc.json).
--
-- flaircad's results come back into Orthanc (FLAIRCAD_DESTINATIONS in compose.yaml) as new
-- series of the source study and must never be routed to flaircad again: its explanation (SC) series is
-- a Secondary Capture (Modality OT) and its report an SR, both with Manufacturer "flaircad" and a
-- SeriesDescription that starts with "flaircad". Each test alone stops the loop; all three are
-- kept in case a PACS rewrites one (README: Connect your PACS). The phantoms' Manufacturer is
-- "flaircad phantom", which is routed. flaircad itself refuses non-FLAIR series (not_flair).

local SERVER = "flaircad"

function OnStableSeries(seriesId, tags, metadata)
   local modality = tags["Modality"] or ""
   local manufacturer = tags["Manufacturer"] or ""
   local description = tags["SeriesDescription"] or ""
   if modality ~= "MR" or manufacturer == "flaircad" or
         string.lower(string.sub(description, 1, 8)) == "flaircad" then
      return
   end
   local body = DumpJson({ Resources = { seriesId }, Synchronous = false }, true)
   -- builtin = false: the route belongs to the DICOMweb plugin, not to Orthanc's core API
   RestApiPost("/dicom-web/servers/" .. SERVER .. "/stow", body, false)
   print("flaircad: queued STOW-RS of series " .. seriesId)
end
