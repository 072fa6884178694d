"""The peer's users service: a Flask app, served by gunicorn.

- ``POST /user/register``: validate, hash the password with Argon2id,
  insert the user, then ask Celery for the welcome email.
- ``GET /healthz``: the process answers.

Errors are JSON, ``{"error": {"code", "message", "field"}}``, with the
codes and statuses of herald's contract (README, "The API").

``PEER_DATABASE`` names the SQLite file; ``run.sh`` creates its schema
before gunicorn starts (see ``gunicorn.conf.py``).
"""

import json
import os

from argon2 import PasswordHasher, Type
from flask import Flask, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

import store
from registration import CHINESE, FieldError, parse_registration
from tasks import send_welcome_email

MAX_BODY_BYTES = 16 * 1024

# herald's parameters exactly: Argon2id, 19 MiB, 2 passes, 1 lane, a
# 32-byte hash and a 16-byte salt (OWASP's recommendation).
password_hasher = PasswordHasher(
    time_cost=2,
    memory_cost=19 * 1024,
    parallelism=1,
    hash_len=32,
    salt_len=16,
    type=Type.ID,
)

SUCCESS_MESSAGES = {CHINESE: "用户注册成功"}


class ApiError(Exception):
    """A refusal with its status, stable code and message for people."""

    def __init__(self, status, code, message, field=None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field


def create_app():
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.config["DATABASE"] = os.environ.get("PEER_DATABASE", "peer.db")
    app.json.ensure_ascii = False
    app.teardown_appcontext(_close_database)
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(FieldError, _field_error)
    app.register_error_handler(store.Taken, _taken)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
    app.add_url_rule("/healthz", view_func=healthz, methods=["GET"])
    app.add_url_rule("/user/register", view_func=register, methods=["POST"])
    return app


def healthz():
    return jsonify(status="ok")


def register():
    # Refuse what is not JSON before reading it.
    _check_json()
    fields = _json_object()
    registration = parse_registration(
        fields, request.headers.get("Accept-Language")
    )

    # Answer a known duplicate before spending a hash on it.
    database = _database()
    taken = store.find_taken(database, registration)
    if taken:
        raise store.Taken(taken)

    password_hash = password_hasher.hash(registration.password)
    store.insert_user(database, registration, password_hash)

    # The user is committed; now the email is requested. If the broker is
    # down, .delay raises after the commit and the user never gets the
    # email, while a retry of the request is refused as a duplicate: two
    # writes, to two systems, with nothing tying them together. That is
    # the dual-write problem herald's outbox solves (the event is staged
    # in the same transaction as the user). The peer keeps it on purpose,
    # because that is how this service is usually written.
    send_welcome_email.delay(
        registration.user_id,
        registration.user_name,
        email=registration.email,
        locale=registration.locale,
    )

    message = SUCCESS_MESSAGES.get(registration.locale, "User registered")
    body = {"message": message, "user_id": registration.user_id}
    return jsonify(body), 201


def _check_json():
    """Accepts application/json (or application/*+json), UTF-8, plain."""
    mimetype = request.mimetype
    is_json = mimetype == "application/json" or (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    )
    if not is_json:
        raise _unsupported("send the body as application/json")
    charset = request.mimetype_params.get("charset", "utf-8").lower()
    if charset not in ("utf-8", "utf8"):
        raise _unsupported("only UTF-8 JSON is accepted")
    encoding = request.headers.get("Content-Encoding", "identity").lower()
    if encoding.strip() != "identity":
        raise _unsupported(
            "compressed bodies are not accepted; send plain JSON"
        )


def _unsupported(message):
    return ApiError(415, "unsupported_media_type", message)


def _json_object():
    try:
        text = request.get_data(cache=False).decode("utf-8")
    except UnicodeDecodeError:
        raise _unsupported(
            "the body is not UTF-8; only UTF-8 JSON is accepted"
        ) from None
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as error:
        raise ApiError(
            400, "malformed_json", f"the body is not valid JSON: {error}"
        ) from None
    if not isinstance(fields, dict):
        raise ApiError(400, "malformed_json", "the body must be a JSON object")
    return fields


def _database():
    """This request's connection, opened on first use."""
    if "database" not in g:
        g.database = store.connect(current_app.config["DATABASE"])
    return g.database


def _close_database(_error):
    database = g.pop("database", None)
    if database is not None:
        database.close()


def _error_body(status, code, message, field=None):
    error = {"code": code, "message": message}
    if field:
        error["field"] = field
    return jsonify(error=error), status


def _api_error(error):
    return _error_body(error.status, error.code, error.message, error.field)


def _field_error(error):
    return _error_body(422, error.code, error.message, error.field)


def _taken(error):
    return _error_body(409, "already_registered", str(error), error.field)


# Werkzeug's own refusals, in the contract's words.
_HTTP_ERRORS = {
    404: ("not_found", "no such route"),
    405: ("method_not_allowed", "this route does not take that method"),
    413: ("body_too_large", "the body is larger than 16 KiB"),
}


def _http_error(error):
    code, message = _HTTP_ERRORS.get(
        error.code, ("http_error", error.description)
    )
    response, status = _error_body(error.code, code, message)
    if error.code == 405:
        response.headers["Allow"] = ", ".join(error.valid_methods or [])
    return response, status


def _unexpected(error):
    # The cause goes to gunicorn's error log, never to the client.
    current_app.logger.exception("registration failed")
    return _error_body(500, "internal", "something went wrong on our side")
