"""What the tests and the benchmarks share: the driver run as a real process, with the CSI
stubs to talk to it and the host clean-up around it. Neither the driver nor the benchmarks
import ``tests`` (a contract in pyproject.toml)."""
