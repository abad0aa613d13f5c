"""The lighthouse liveness proxy (`marduk lighthouse-proxy`), run by the job next to torchft's
lighthouse so that a replica group marduk sends away stops counting at once (`proxy`)."""
