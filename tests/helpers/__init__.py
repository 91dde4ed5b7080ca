"""One copy of each thing the tests share; tests/conftest.py makes fixtures of them.

ray_cluster (a local Ray, a `ray start --head` subprocess head), fake_cluster (a head with a
fake-provider autoscaler), s3 (a loopback S3 server and dummy credentials), images (RETFound image
trees and encoded images), core (the DINO core tests' tiny config and random crops).  Free ports come from `raydino.distributed.cluster.free_port`.
"""
