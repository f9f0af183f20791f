"""`downloads` (or `python -m download_client.cli`): submit downloads, watch them, wait for them
again, cancel them, see the fleet's status."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TextIO

from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from download_client import commands
from download_client.inputs import InputError
from download_client.settings import SettingsError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TIMEOUT, EXIT_INTERRUPTED = (
    0,
    1,
    2,
    3,
    4,
    130,
)

EPILOG = """\
environment (the same settings as the workers; each is checked):
  CELERY_BROKER_URL            broker (default redis://localhost:6379/0)
  CELERY_RESULT_BACKEND        where results live (default: database 1 of the broker's Redis)
  DOWNLOAD_RESULT_EXPIRES      seconds the record of a submitted id is kept (as results are)
  DOWNLOAD_REDACT_PARAMS       more query parameter names whose values are shown as ***
  DOWNLOAD_VISIBILITY_TIMEOUT  the broker's visibility timeout, as the workers have it
  NO_COLOR, COLUMNS            the live view and tables: no colours; the terminal's width

exit codes:
  0    all succeeded (or were queued, without --wait; or cancelled)
  1    one or more failed, were cancelled, or are unknown
  2    bad usage: nothing was sent (a bad line of -i FILE: the lines before it were)
  3    the broker, the result backend or the workers could not be reached
  4    --timeout ran out before every download ended
  130  interrupted (Ctrl-C): the downloads go on; `downloads wait ID...` follows them
"""

INPUT_FORMAT = """\
input file (-i FILE, or - for standard input), one download a line:
  URL [DEST] [SHA256]                           separated by spaces or tabs
  {"url": "...", "dest": "...", "headers": {}}  a JSON object of the task's arguments
                                                (url, dest, sha256, headers, max_bytes,
                                                callback_url)
  blank lines and lines starting with # are skipped; --header and --max-bytes apply to
  every line. Lines are checked and queued as they are read, in flat memory: the first
  bad line stops the command (exit 2), and the downloads of the lines before it stay
  queued (their ids are printed).

output without --wait: `ID  URL` a line as each is queued; --ids: the ID alone; --json: one
  array. `downloads wait -i`, `cancel -i` and `result -i` read either back (the first field of
  each line), so `downloads submit -i list | downloads wait -i -` waits for them all.

"""


def _parser() -> argparse.ArgumentParser:
    doc = (__doc__ or "").split("\n\n")[0].replace("\n", " ")
    parser = _new(argparse.ArgumentParser, prog="downloads", description=doc)
    sub = parser.add_subparsers(dest="command", required=True)
    _submit_parser(sub)
    w = _new(sub.add_parser, "wait", help="wait for downloads by id (as submit --wait)")
    _id_arguments(w)
    w.add_argument("--timeout", type=float, default=None, help="seconds to wait at most")
    w.add_argument("--json", action="store_true", help="print JSON for machines")
    c = _new(sub.add_parser, "cancel", help="cancel downloads by id (a running one is stopped)")
    _id_arguments(c)
    c.add_argument("--json", action="store_true", help="print JSON for machines")
    st = _new(sub.add_parser, "status", help="workers, queue depth, active and retrying downloads")
    st.add_argument("--json", action="store_true", help="print JSON for machines")
    st.add_argument("--queue", default="celery", help="queue whose depth to show")
    r = _new(sub.add_parser, "result", help="state and result of downloads by id")
    _id_arguments(r)
    r.add_argument("--json", action="store_true", help="print JSON for machines")
    return parser


def _id_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ids", nargs="*", metavar="ID")
    parser.add_argument(
        "-i",
        "--input",
        metavar="FILE",
        help="more ids (- : stdin): the first field of each line, as submit prints them",
    )


def _new(
    make: Callable[..., argparse.ArgumentParser], *args: str, **kw: str
) -> argparse.ArgumentParser:
    """A parser whose help ends with the environment variables and the exit codes."""
    return make(*args, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, **kw)


def _submit_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser(
        "submit",
        help="queue downloads (and wait for them with --wait)",
        epilog=INPUT_FORMAT + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("urls", nargs="*", metavar="URL")
    s.add_argument("-i", "--input", metavar="FILE", help="downloads from a file (- : stdin)")
    s.add_argument("--dest", help="destination under DOWNLOAD_DIR (one URL only)")
    s.add_argument("--sha256", help="expected sha256 (one URL only)")
    s.add_argument(
        "--mirror",
        action="append",
        default=[],
        metavar="URL",
        help="another URL of the same bytes (one URL, with --sha256; repeatable)",
    )
    s.add_argument("--max-bytes", type=int, help="size cap for each download")
    s.add_argument(
        "--deadline",
        metavar="SECONDS|TIME",
        help="retry transient faults until then: seconds from now, or an ISO 8601 time with a "
        "zone (2026-12-08T18:00:00Z)",
    )
    s.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME:VALUE",
        help="extra request header (repeatable)",
    )
    s.add_argument("--queue", help="queue to send to (default: celery)")
    s.add_argument(
        "--urgent",
        action="store_true",
        help="send to the queue's express lane: started ahead of the queue's backlog",
    )
    s.add_argument(
        "--group",
        metavar="NAME",
        help="the submitter group whose share of the workers these take (default: default)",
    )
    s.add_argument("--wait", action="store_true", help="wait, with progress, and summarise")
    s.add_argument("--timeout", type=float, default=None, help="seconds to wait at most")
    s.add_argument("--json", action="store_true", help="print JSON for machines")
    s.add_argument(
        "--ids",
        action="store_true",
        help="print only the ids, one a line (for ID=$(...) and `| downloads wait -i -`)",
    )


COMMANDS = {
    "submit": commands.submit,
    "wait": commands.wait_for,
    "cancel": commands.cancel_ids,
    "status": commands.status,
    "result": commands.results,
}


def main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    try:
        args = _parser().parse_args(argv)
        return COMMANDS[args.command](args, out)
    except (commands.UsageError, SettingsError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OperationalError, RedisError, ConnectionError) as exc:
        print(f"error: cannot reach the broker or the result backend: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:  # anywhere else (connecting, reading): nothing half done
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
