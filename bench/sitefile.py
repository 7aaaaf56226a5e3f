"""Reading a site file of N PVs: the YAML parse and the whole of ``parse_site``, timed apart.

``python -m bench.sitefile --count N`` renders the benchmark site of N PVs as site-file
text (:func:`bench.site.site_yaml`, not timed), then times, each in a fresh measurement:
``yaml.load`` with labctl's loader (libyaml's C parser when PyYAML has it), the schema
validation, and :func:`labctl.server.site.parse_site` -- the YAML, the schema validation and the
cross-reference checks, what ``labctl serve`` does with a site file before building
anything. It does so for the N PVs listed one by one (``yaml_s``, ``validate_s``,
``parse_site_s``) and written as one numbered entry (``range``, as ``labctl serve`` reads
it in the scale scenario: ``numbered_*``). It reports the result as its ``ready`` event
and exits when told to stop.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from typing import Any

import yaml

from bench.site import site_data, site_yaml
from bench.wire import Requests, emit


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args()
    from labctl.ioc.config.loader import SiteLoader
    from labctl.server.site import SiteConfig, parse_site

    timings: dict[str, Any] = {}
    for form, numbered in (("", False), ("numbered_", True)):
        data = site_data(args.count, state_dir=tempfile.gettempdir(), numbered=numbered)
        text = site_yaml(data)
        del data
        t = time.perf_counter()
        loaded = yaml.load(text, Loader=SiteLoader)  # noqa: S506 -- SiteLoader is a SafeLoader
        timings[form + "yaml_s"] = time.perf_counter() - t
        t = time.perf_counter()
        SiteConfig.model_validate(loaded)
        timings[form + "validate_s"] = time.perf_counter() - t
        del loaded
        t = time.perf_counter()
        site = parse_site(text, "bench.yaml")
        timings[form + "parse_site_s"] = time.perf_counter() - t
        timings[form + "bytes"] = len(text.encode())
        assert sum(1 for _ in site.iter_pvs()) == args.count
        del site, text
    loop = asyncio.get_running_loop()
    requests = Requests(loop, {})
    requests.start()
    emit(
        {
            "event": "ready",
            "pvs": args.count,
            "libyaml": SiteLoader.__mro__[1].__name__ == "CSafeLoader",
            **timings,
        }
    )
    await requests.stopped.wait()


if __name__ == "__main__":
    asyncio.run(main())
