"""Everything lg-rotate does with the Kubernetes API, one job per module.

========================  ==============================================================
``api``                   connecting (kubeconfig, in-cluster), one API call as plain JSON,
                          its errors with RBAC hints, name checks
``secret``                the shared Secret target (create / merge patch with
                          resourceVersion, annotations)
``lease``                 the rotation lock (a Lease per Secret)
``workloads``             ``kind/NAME`` references, restarts, following a rollout
``events``                Events on the Secret
``pods``                  agent pods: container starts, readiness, pod and workload calls
``podsecrets``            the per-pod Secret contract: naming, labels, annotations, body
``collisions``            which token each start may have read; who collided
``podsecret_keeper``      ``watch``'s per-pod work: adopt, delete orphans, refresh unstarted
``controller``            ``lg-rotate watch``: a rotation after every start, leader election
``roll``                  ``lg-rotate roll``: rotate, delete one pod, wait Ready, resumable
``webhook``               ``lg-rotate webhook``: a Secret and token of its own per new pod
========================  ==============================================================

The official ``kubernetes`` client is imported only inside the functions that call it, so
importing any of these modules is cheap.
"""
