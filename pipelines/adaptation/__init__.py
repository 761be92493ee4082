"""Phase 2 of the data-factory method: local domain adaptation (encoder, branch, jobs, volumes)."""
