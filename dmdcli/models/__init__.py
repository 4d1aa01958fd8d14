"""Model helpers: building, loading and describing the diffusion pipelines that dmd distills."""
