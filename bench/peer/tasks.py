"""The Celery side of the peer: the ``tasks.send_welcome_email`` task.

The Flask app imports this module to call ``send_welcome_email.delay``;
a Celery worker (``celery -A tasks worker``) imports it to run the task,
which sends the welcome email over SMTP with ``smtplib``.

Configuration comes from the environment:

- ``PEER_AMQP_URL``: the RabbitMQ broker, including its virtual host.
- ``PEER_SMTP_HOST``, ``PEER_SMTP_PORT``: where to send mail
  (127.0.0.1:5125, the sink that ``run.sh`` starts).
- ``PEER_MAIL_FROM``: the From header.

Messages use Celery's defaults (protocol 2, JSON). Results are not
stored: nothing waits on them.
"""

import os
import smtplib
from email.message import EmailMessage
from email.utils import formataddr

from celery import Celery

from registration import CHINESE

SMTP_TIMEOUT_SECS = 10


def _broker_url():
    url = os.environ.get("PEER_AMQP_URL")
    if not url:
        raise RuntimeError(
            "set PEER_AMQP_URL to the RabbitMQ URL, with its virtual host"
        )
    return url


app = Celery("tasks", broker=_broker_url())
app.conf.update(
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
)


class NoAddress(Exception):
    """The task was called without any address to write to."""


@app.task(
    name="tasks.send_welcome_email",
    autoretry_for=(smtplib.SMTPException, OSError),
    retry_backoff=True,
    max_retries=5,
)
def send_welcome_email(user_id, user_name, email=None, locale=None):
    """Sends the welcome email to ``email``, else to ``user_id`` when that
    is an address. SMTP trouble is retried with backoff, five times."""
    address = email or (user_id if "@" in user_id else None)
    if address is None:
        raise NoAddress(f"no email address for user {user_id}")
    message = welcome_message(user_id, user_name, address, locale)
    host = os.environ.get("PEER_SMTP_HOST", "127.0.0.1")
    port = int(os.environ.get("PEER_SMTP_PORT", "5125"))
    with smtplib.SMTP(host, port, timeout=SMTP_TIMEOUT_SECS) as smtp:
        smtp.send_message(message)


def welcome_message(user_id, user_name, address, locale):
    """The email itself. The name is user input: the headers API encodes
    it (RFC 2047 for non-ASCII), so it cannot add a header."""
    message = EmailMessage()
    message["From"] = os.environ.get(
        "PEER_MAIL_FROM", "herald peer <welcome@peer.localhost>"
    )
    message["To"] = formataddr((user_name, address))
    if locale == CHINESE:
        message["Subject"] = f"欢迎，{user_name}！"
        message.set_content(
            f"{user_name}，您好！\n\n"
            f"欢迎加入！您的账户 {user_id} 已经创建成功。\n"
        )
    else:
        message["Subject"] = f"Welcome, {user_name}!"
        message.set_content(
            f"Hello {user_name},\n\n"
            f"Welcome aboard! Your account {user_id} is ready.\n"
        )
    return message
