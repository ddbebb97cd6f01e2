# Entry points. `make run` and `make test` work on a fresh Debian 12 machine (as root).
.PHONY: run test lint unit sanity vm e2e image proto deploy bench registration scale clean

run:  ## install what is needed and run the driver on its embedded default
	scripts/run.sh

test:  ## install what is needed and run the whole test suite (all lanes)
	scripts/test.sh

lint:
	scripts/install-python.sh && scripts/lint.sh

unit:
	scripts/install-python.sh && .venv/bin/pytest -q tests/unit

sanity:
	CSI_TEST_LANES=host scripts/install-python.sh && .venv/bin/pytest -q tests/sanity

vm:
	scripts/install-python.sh && scripts/test-vm.sh

e2e:
	scripts/install-python.sh && scripts/test-e2e.sh

VERSION := $(shell scripts/version.sh)

image:  ## the driver image built from the Dockerfile without Docker (buildah), as an OCI archive
	scripts/build-image.sh --out dist/csi-driver-$(VERSION).oci.tar

proto:
	scripts/gen-proto.sh

deploy:
	scripts/render-deploy.sh

registration:  ## plugin registration with the real csi-node-driver-registrar and livenessprobe
	scripts/install-python.sh && .venv/bin/pytest -q tests/integration/test_plugin_registration.py

bench:  ## run the benchmarks (docs/benchmarks.md)
	scripts/bench.sh

scale:  ## 100 simulated nodes, 2,000 Pods with PVCs arriving at 5/s: rate, capacity, footprint (docs/scale.md)
	scripts/scale.sh --create-rate 5

clean:
	rm -rf .data .venv .pytest_cache
