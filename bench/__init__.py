"""Benchmarks (not tests): throughput of merged vs unmerged encoders, the matching step alone,
the indexing pipeline and the efficient-architecture baselines. Each module runs as a script and
its figures go into docs/BENCHMARKS.md with the command that produced them."""
