"""The development harness, apart from what audits: the model zoo (real data, clean and
backdoored providers), the Neural Cleanse baseline, `make demo` and the local MLflow
server and receiver it and the tests run."""
