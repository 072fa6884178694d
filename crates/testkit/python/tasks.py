"""Celery tasks of the original Python service.

The Flask app queues these; a Celery worker runs them:

    celery -A tasks worker --loglevel=INFO

Results go back through the ``rpc://`` backend, so the caller can wait
on ``AsyncResult.get()``.
"""

import os
import smtplib
from email.message import EmailMessage

from celery import Celery

app = Celery(
    "tasks",
    broker=os.environ["CELERY_BROKER_URL"],
    backend="rpc://",
)

SENDER = "welcome@example.com"


@app.task
def send_welcome_email(user_id, user_name, email=None, locale=None):
    """Send the welcome email to a user who just signed up."""
    address = email or (user_id if "@" in str(user_id) else None)
    if not address:
        raise ValueError(f"no email address for user {user_id!r}")

    message = EmailMessage()
    message["From"] = SENDER
    message["To"] = address
    message["Subject"] = f"Welcome, {user_name}!"
    message.set_content(
        f"Hello {user_name},\n\nthanks for signing up. We are glad "
        "you are here.\n"
    )

    host = os.environ.get("SMTP_HOST", "localhost")
    port = int(os.environ.get("SMTP_PORT", "25"))
    with smtplib.SMTP(host, port, timeout=30) as smtp:
        smtp.send_message(message)

    return {"sent_to": address, "user_name": user_name}
