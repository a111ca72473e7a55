"""The lab: the fleet simulator, fetchers and runners of Prometheus and Alertmanager, and the
demo built from them. Only the ``simulate`` and ``demo`` commands, the tests and the benchmarks
import it; the serving core never does (tests/test_layout.py)."""
