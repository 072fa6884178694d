"""The peer's SMTP sink: accepts every message and files it in a Maildir.

Each message becomes one file in ``<maildir>/new/``, written in ``tmp/``
and renamed into place, so a file that appears is complete and its
modification time is when the message arrived. Line endings are stored
as LF. ``herald bench register --mail-dir <maildir>`` matches each file
to its registration by the address in the ``To:`` header.

    python smtp_sink.py --port 5125 --maildir DIR
"""

import argparse
import mailbox
import signal
import threading

from aiosmtpd.controller import Controller


class MaildirHandler:
    """aiosmtpd's handler: one Maildir file per message."""

    def __init__(self, path):
        self.maildir = mailbox.Maildir(path, create=True)

    async def handle_DATA(self, server, session, envelope):
        content = envelope.original_content.replace(b"\r\n", b"\n")
        self.maildir.add(content)
        return "250 Message accepted for delivery"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5125)
    parser.add_argument("--maildir", required=True)
    args = parser.parse_args()

    controller = Controller(
        MaildirHandler(args.maildir), hostname=args.host, port=args.port
    )
    controller.start()
    print(f"smtp sink listening on {args.host}:{args.port}", flush=True)

    # Serve until SIGTERM or SIGINT, then close the listener.
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    controller.stop()


if __name__ == "__main__":
    main()
