"""`vlkit k8s`: Kubernetes manifests for the 16gb profile (vLLM), generated from the planner's plan.

names.py checks what the user names (objects, secrets, node labels); resources.py sizes what a pod
asks for (CPU, memory, /dev/shm, the cache volume); manifests.py turns a plan into the objects and
YAML; cli.py is the command. See docs/KUBERNETES.md.
"""
