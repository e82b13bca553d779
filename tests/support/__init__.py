"""The test suite's helpers (tests/README.md): throwaway servers (servers, cluster_support, tls_support), a TCP
proxy that drops or stalls connections (tcp_proxy), the Redis-tier and near-cache fixtures and helpers
(redis_support, near_support), the randomized fault checker's harness and workload (chaos_support,
chaos_workload) and leak checks (leaks). Imported as `support.<module>`: tests/ is on sys.path, as pytest puts
the directory of the rootless conftest.py there (and benches/ and subprocess scripts put it there themselves).
"""
