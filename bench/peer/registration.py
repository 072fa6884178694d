"""What a registration request must hold, checked field by field.

The rules are herald's public contract for ``POST /user/register`` (see
"The API" in the top-level README), written the way a Flask team would:
plain functions over the decoded JSON object, raising ``FieldError`` for
the first rule broken. A ``Registration`` is the request once every field
has passed; nothing after it looks at the raw JSON again.

The address a welcome email goes to is ``email`` when given, else
``user_id`` when that is itself an address. The locale is the ``locale``
field, else the one ``Accept-Language`` prefers, else English.
"""

import re
import unicodedata
from dataclasses import dataclass

ENGLISH = "en"
CHINESE = "zh-CN"

USER_ID_MAX_LEN = 64
USER_NAME_MAX_CHARS = 100
PASSWORD_MIN_CHARS = 8
PASSWORD_MAX_CHARS = 1024
EMAIL_MAX_BYTES = 254

_USER_ID_CHARS = re.compile(r"[A-Za-z0-9._@+-]+")
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
_DOMAIN_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")

# Characters that could add a line to a header or make text read
# backwards: line and paragraph separators, and the bidirectional marks,
# embeddings, overrides and isolates.
_LINE_SEPARATORS = {"\u2028", "\u2029"}
_BIDI_CONTROLS = {"\u061c", "\u200e", "\u200f"} | {
    chr(c) for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]
}

# Characters that draw nothing although they are not whitespace: Hangul
# fillers, the blank Braille pattern and the variation selectors. Format
# characters (category Cf: zero-width spaces and joiners, tags, the byte
# order mark) are caught by their category.
_BLANK_FILLERS = {"\u115f", "\u1160", "\u3164", "\uffa0", "\u2800"} | {
    chr(c) for c in [*range(0x180B, 0x1810), *range(0xFE00, 0xFE10)]
}


class FieldError(Exception):
    """A field that broke its rule: the field, a stable code, a message."""

    def __init__(self, field, code, message):
        super().__init__(message)
        self.field = field
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Registration:
    """A request whose every field passed its rule."""

    user_id: str
    user_name: str
    password: str
    email: str
    locale: str

    @property
    def email_key(self):
        """The form addresses are compared in for uniqueness."""
        return self.email.lower()


def parse_registration(fields, accept_language=None):
    """Checks the fields in a fixed order; raises the first FieldError."""
    user_id = parse_user_id(_required(fields, "user_id"))
    user_name = parse_user_name(_required(fields, "user_name"))
    password = parse_password(_required(fields, "user_password"))

    email_text = _optional(fields, "email")
    if email_text is not None:
        email = parse_email(email_text, "email")
    else:
        try:
            email = parse_email(user_id, "user_id")
        except FieldError:
            raise FieldError(
                "email",
                "no_address",
                "email is required when user_id is not an email address",
            ) from None

    locale_text = _optional(fields, "locale")
    if locale_text is not None:
        locale = parse_locale(locale_text)
    else:
        locale = preferred_locale(accept_language or "") or ENGLISH
    return Registration(user_id, user_name, password, email, locale)


def _optional(fields, field):
    """A string field, or None when it is missing or null."""
    value = fields.get(field)
    if value is None or isinstance(value, str):
        return value
    raise FieldError(field, "wrong_type", f"{field} must be a string")


def _required(fields, field):
    value = _optional(fields, field)
    if value is None:
        raise FieldError(field, "missing", f"{field} is required")
    return value


def parse_user_id(text):
    if not text:
        raise FieldError("user_id", "too_short", "user_id is empty")
    if len(text) > USER_ID_MAX_LEN:
        raise FieldError(
            "user_id", "too_long", "user_id is longer than 64 characters"
        )
    if not _USER_ID_CHARS.fullmatch(text):
        raise FieldError(
            "user_id",
            "invalid_characters",
            "user_id may contain only ASCII letters, digits and ._@+-",
        )
    return text


def parse_user_name(text):
    name = text.strip()
    if not name:
        raise FieldError("user_name", "too_short", "user_name is empty")
    if len(name) > USER_NAME_MAX_CHARS:
        raise FieldError(
            "user_name", "too_long", "user_name is longer than 100 characters"
        )
    if any(_breaks_a_line(c) or c in _BIDI_CONTROLS for c in name):
        raise FieldError(
            "user_name",
            "invalid_characters",
            "user_name may not contain control characters or line breaks",
        )
    if all(_is_invisible(c) for c in name):
        raise FieldError(
            "user_name", "too_short", "user_name has no visible character"
        )
    return name


def _breaks_a_line(char):
    return unicodedata.category(char) == "Cc" or char in _LINE_SEPARATORS


def _is_invisible(char):
    return (
        char.isspace()
        or unicodedata.category(char) == "Cf"
        or char in _BLANK_FILLERS
    )


def parse_password(text):
    """Counts characters (code points), as the contract does."""
    if len(text) < PASSWORD_MIN_CHARS:
        raise FieldError(
            "user_password",
            "too_short",
            "user_password must be at least 8 characters",
        )
    if len(text) > PASSWORD_MAX_CHARS:
        raise FieldError(
            "user_password",
            "too_long",
            "user_password must be at most 1024 characters",
        )
    return text


def parse_email(text, field):
    """An ASCII address: a dot-atom, @, and a domain of two or more labels
    whose last one has a letter. The error names ``field``."""
    address = text.strip()
    if len(address.encode()) > EMAIL_MAX_BYTES:
        raise FieldError(
            field, "too_long", f"{field} is longer than 254 bytes"
        )

    def invalid(why):
        return FieldError(
            field,
            "invalid_email",
            f"{field} is not a valid email address: {why}",
        )

    local, at, domain = address.rpartition("@")
    if not at:
        raise invalid("no @")
    atoms = local.split(".")
    if len(local) > 64 or not all(_ATOM.fullmatch(a) for a in atoms):
        raise invalid("the part before @ is not valid")
    labels = domain.split(".")
    named_top_level = any(c.isalpha() for c in labels[-1])
    if (
        len(domain) > 253
        or len(labels) < 2
        or not all(_DOMAIN_LABEL.fullmatch(label) for label in labels)
        or not named_top_level
    ):
        raise invalid("the part after @ is not a domain name")
    return address


def parse_locale(text):
    tag = text.lower()
    if tag == "en":
        return ENGLISH
    if tag == "zh-cn":
        return CHINESE
    raise FieldError(
        "locale", "unsupported_locale", "locale must be en or zh-CN"
    )


def preferred_locale(accept_language):
    """The locale an Accept-Language header weighs highest among English
    and Chinese (any ``zh`` tag), the earlier one on a tie; None when it
    names neither."""
    best_weight, best = 0.0, None
    for item in accept_language.split(","):
        tag, *params = (part.strip() for part in item.split(";"))
        weight = 1.0
        for param in params:
            if param.startswith("q="):
                try:
                    weight = float(param[2:])
                except ValueError:
                    weight = 0.0
        language = tag.lower().split("-")[0]
        locale = {"en": ENGLISH, "zh": CHINESE}.get(language)
        if locale and weight > best_weight:
            best_weight, best = weight, locale
    return best
