"""Benchmarks of the gateway against its floor and its peers (see docs/benchmarks.md).

* :mod:`bench.run`: the one command; starts every target, measures, writes ``bench/results/latest.{md,json}``;
* :mod:`bench.profile`: py-spy profile of one gateway worker under load;
* :mod:`bench.micro`: in-process cost of the limiter and the credit ledger per storage;
* :mod:`bench.inproc`: the whole paid request in-process (CPU per request, gateway next to bare; ``--profile``);
* :mod:`bench.loadgen`: the asyncio HTTP/1.1 load driver; :mod:`bench.procstat`: CPU and RSS from ``/proc``;
* :mod:`bench.targets`: starting and stopping the servers; :mod:`bench.report`: medians, ratios, Markdown;
* :mod:`bench.bare_passthrough` (+ ``gunicorn_bare.conf.py``): the Flask + requests baseline;
* :mod:`bench.mock_upstream`: the fake OpenAI upstream every target forwards to.
"""
