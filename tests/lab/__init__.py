"""The project's own test lab: certificates, the test peer, real servers and namespaces.

Used by the tests, the benchmarks and the quick-start demo; never by the agent.
"""
