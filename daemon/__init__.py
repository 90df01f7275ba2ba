"""The per-station service: lifecycle, config, control API, discovery, peer sync, security."""
