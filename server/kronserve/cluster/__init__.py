"""Scale-out on Ray Serve: a gateway deployment serving the same `/v1` API in front of N backbone replicas.

ring.py picks a task's replica (rendezvous hashing, bounded-load spill); replica.py is a backbone
replica (the single-process `Service` with a name and a change feed); gateway.py implements the API's
`Backend` by pinning the store's version and forwarding; app.py builds and runs the Serve application.
Ray is imported only here, so the single-process server never needs it.
"""
