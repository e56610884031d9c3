"""dnstls-agent: private DNS by default for machines that get resolvers from DHCP."""

__version__ = "0.1.0"
