"""Benchmarks behind `fleetvisor bench ...`: each measures a figure and its baseline in one run.

Modules are imported on demand (a benchmark's dependencies stay out of the others' runs):

launch      API-call-to-running latency of instances, cold and cached, against raw `runc run -d`
placement   engine placements/s (basic and with hard groups), violations, hosts used vs CP-SAT
"""
