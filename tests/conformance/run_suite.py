"""
Run Autobahn|Testsuite's fuzzing client (ported by port_suite.py) with a spec.

    python tests/conformance/run_suite.py SPEC.json [TIMEOUT]

The spec is the suite's own fuzzingclient format (servers, cases,
exclude-cases, outdir).  The suite writes its reports (index.json, one JSON
and one HTML file per case, index.html) into the spec's outdir and stops the
reactor when every case has run.  Runs in its own process: the suite drives
the global reactor and stops it.  Exits 1 if the reports cannot be written
or the run takes longer than TIMEOUT seconds (default 600).
"""

import json
import os
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))


def main(spec_path: str, timeout: float) -> int:
    sys.path.insert(0, HERE)
    import port_suite

    sys.path.insert(0, port_suite.port())
    with open(spec_path) as f:
        spec = json.load(f)

    from autobahntestsuite import fuzzing
    from twisted.internet import reactor

    status = []

    def fail(message: str) -> None:
        print(message, file=sys.stderr, flush=True)
        status.append(1)
        if reactor.running:
            reactor.stop()

    create_reports = fuzzing.FuzzingClientFactory.createReports

    def guarded_reports(self, *args, **kwargs):
        # The suite stops the reactor after its reports; a report that
        # raises would leave the process running forever.
        try:
            return create_reports(self, *args, **kwargs)
        except Exception:
            fail("run_suite: the reports could not be written:\n" + traceback.format_exc())

    fuzzing.FuzzingClientFactory.createReports = guarded_reports
    timer = reactor.callLater(timeout, fail, f"run_suite: not finished after {timeout} s")
    fuzzing.startClient(spec)
    reactor.run()
    if timer.active():
        timer.cancel()
    return 1 if status else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 600.0))
