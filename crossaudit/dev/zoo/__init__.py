"""Model zoo: providers' clean and backdoored models trained on real data, for demo, tests and benchmarks."""
