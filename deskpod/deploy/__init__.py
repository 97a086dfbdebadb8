"""`deskpod deploy`: Kubernetes manifests for a model, sized by the planner (config → sizing → manifests)."""
