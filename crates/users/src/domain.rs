//! What a registration is made of, parsed at the edge.
//!
//! Every field of a request becomes a type whose constructor enforces its
//! rule, so nothing past the HTTP layer sees a raw string from a client.
//! A rule broken is a [`FieldError`]: which field, a stable code, and a
//! message a person can act on.

use std::fmt;

pub use contracts::Locale;

/// A field that broke its rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: &'static str,
    /// Stable, for programs: `missing`, `wrong_type`, `too_short`,
    /// `too_long`, `invalid_characters`, `invalid_email`,
    /// `unsupported_locale`, `no_address`.
    pub code: &'static str,
    pub message: String,
}

impl FieldError {
    fn new(
        field: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        FieldError {
            field,
            code,
            message: message.into(),
        }
    }
}

/// The id a user registers with: 1 to 64 ASCII letters, digits and
/// `._@+-`, so that an email address can serve as one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserId(String);

impl UserId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(text: &str) -> Result<Self, FieldError> {
        const FIELD: &str = "user_id";
        if text.is_empty() {
            return Err(FieldError::new(
                FIELD,
                "too_short",
                "user_id is empty",
            ));
        }
        if text.len() > Self::MAX_LEN {
            return Err(FieldError::new(
                FIELD,
                "too_long",
                "user_id is longer than 64 characters",
            ));
        }
        let allowed =
            |c: char| c.is_ascii_alphanumeric() || "._@+-".contains(c);
        if !text.chars().all(allowed) {
            return Err(FieldError::new(
                FIELD,
                "invalid_characters",
                "user_id may contain only ASCII letters, digits and ._@+-",
            ));
        }
        Ok(UserId(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The name a user is greeted by: 1 to 100 characters once surrounding
/// whitespace is trimmed, none of them a control character or a line
/// break, so a name can never add a line to a header or a log. Bidirectional
/// overrides, which can make text read backwards, count as control
/// characters, and a name must have at least one visible character.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserName(String);

impl UserName {
    pub const MAX_CHARS: usize = 100;

    pub fn parse(text: &str) -> Result<Self, FieldError> {
        const FIELD: &str = "user_name";
        let name = text.trim();
        if name.is_empty() {
            return Err(FieldError::new(
                FIELD,
                "too_short",
                "user_name is empty",
            ));
        }
        if name.chars().count() > Self::MAX_CHARS {
            return Err(FieldError::new(
                FIELD,
                "too_long",
                "user_name is longer than 100 characters",
            ));
        }
        if name.chars().any(|c| breaks_a_line(c) || reorders_text(c)) {
            return Err(FieldError::new(
                FIELD,
                "invalid_characters",
                "user_name may not contain control characters or line breaks",
            ));
        }
        if name.chars().all(is_invisible) {
            return Err(FieldError::new(
                FIELD,
                "too_short",
                "user_name has no visible character",
            ));
        }
        Ok(UserName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn breaks_a_line(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
}

/// Bidirectional marks, embeddings, overrides and isolates.
fn reorders_text(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}'
        | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Characters that render as nothing: whitespace, Unicode's default
/// ignorable code points (zero-width marks, variation selectors, tags,
/// invisible operators) and the blank fillers some scripts have.
fn is_invisible(c: char) -> bool {
    c.is_whitespace()
        || matches!(c,
            '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}'
            | '\u{17B4}' | '\u{17B5}' | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}' | '\u{2800}' | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}' | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFF8}' | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}' | '\u{E0000}'..='\u{E0FFF}')
}

/// A password as the user typed it: 8 to 1,024 characters. Its `Debug`
/// shows nothing of it, so it cannot leak through a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub const MIN_CHARS: usize = 8;
    pub const MAX_CHARS: usize = 1024;

    pub fn parse(text: &str) -> Result<Self, FieldError> {
        const FIELD: &str = "user_password";
        let chars = text.chars().count();
        if chars < Self::MIN_CHARS {
            return Err(FieldError::new(
                FIELD,
                "too_short",
                "user_password must be at least 8 characters",
            ));
        }
        if chars > Self::MAX_CHARS {
            return Err(FieldError::new(
                FIELD,
                "too_long",
                "user_password must be at most 1024 characters",
            ));
        }
        Ok(Password(text.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// A syntactically valid email address of at most 254 bytes: a dot-atom
/// local part of at most 64 bytes, `@`, and a domain name of two or more
/// labels. Only ASCII addresses are accepted; deliverability is not
/// checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailAddress(String);

impl EmailAddress {
    pub const MAX_LEN: usize = 254;

    /// Parses `text` as the address for `field`, so that the error names
    /// the field the address came from.
    pub fn parse(text: &str, field: &'static str) -> Result<Self, FieldError> {
        let invalid = |why: &str| {
            FieldError::new(
                field,
                "invalid_email",
                format!("{field} is not a valid email address: {why}"),
            )
        };
        let address = text.trim();
        if address.len() > Self::MAX_LEN {
            return Err(FieldError::new(
                field,
                "too_long",
                format!("{field} is longer than 254 bytes"),
            ));
        }
        let (local, domain) =
            address.rsplit_once('@').ok_or_else(|| invalid("no @"))?;
        if !is_dot_atom(local) || local.len() > 64 {
            return Err(invalid("the part before @ is not valid"));
        }
        if !is_domain(domain) {
            return Err(invalid("the part after @ is not a domain name"));
        }
        Ok(EmailAddress(address.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The form two addresses are compared in for uniqueness. Real mail
    /// systems treat the local part case-insensitively, so this is the
    /// whole address in lower case.
    pub fn key(&self) -> String {
        self.0.to_ascii_lowercase()
    }
}

fn is_dot_atom(text: &str) -> bool {
    const SPECIALS: &str = "!#$%&'*+-/=?^_`{|}~";
    let atext = |c: char| c.is_ascii_alphanumeric() || SPECIALS.contains(c);
    !text.is_empty()
        && text
            .split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(atext))
}

fn is_domain(text: &str) -> bool {
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    let labels: Vec<&str> = text.split('.').collect();
    // A top-level domain is never all digits, so `a@127.0.0.1` is refused.
    let top_level_named = labels
        .last()
        .is_some_and(|l| l.chars().any(|c| c.is_ascii_alphabetic()));
    text.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(|l| label_ok(l))
        && top_level_named
}

/// Reads the `locale` field: `en` or `zh-CN`, in any letter case.
pub fn parse_locale(text: &str) -> Result<Locale, FieldError> {
    match text.to_ascii_lowercase().as_str() {
        "en" => Ok(Locale::English),
        "zh-cn" => Ok(Locale::SimplifiedChinese),
        _ => Err(FieldError::new(
            "locale",
            "unsupported_locale",
            "locale must be en or zh-CN",
        )),
    }
}

/// The locale an `Accept-Language` header prefers among those herald
/// speaks: Chinese when a `zh` tag has a higher weight than any `en` tag
/// (or the same weight and comes first), English when English wins, and
/// `None` when the header names neither.
pub fn preferred_locale(accept_language: &str) -> Option<Locale> {
    let mut best: Option<(f32, Locale)> = None;
    for item in accept_language.split(',') {
        let mut parts = item.split(';');
        let tag = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let weight = parts
            .find_map(|p| p.trim().strip_prefix("q="))
            .map_or(Some(1.0), |q| q.trim().parse::<f32>().ok());
        let Some(weight) = weight.filter(|w| *w > 0.0) else {
            continue;
        };
        let primary = tag.split('-').next().unwrap_or("");
        let locale = match primary {
            "zh" => Locale::SimplifiedChinese,
            "en" => Locale::English,
            _ => continue,
        };
        if best.is_none_or(|(w, _)| weight > w) {
            best = Some((weight, locale));
        }
    }
    best.map(|(_, locale)| locale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_allow_exactly_the_documented_characters() {
        assert!(UserId::parse("alice.smith+test@example-1.com").is_ok());
        assert!(UserId::parse(&"a".repeat(64)).is_ok());
        for (bad, code) in [
            ("", "too_short"),
            (&*"a".repeat(65), "too_long"),
            ("alice smith", "invalid_characters"),
            ("alice/bob", "invalid_characters"),
            ("ålice", "invalid_characters"),
        ] {
            assert_eq!(UserId::parse(bad).unwrap_err().code, code, "{bad:?}");
        }
    }

    #[test]
    fn user_names_are_trimmed_and_counted_in_characters() {
        assert_eq!(UserName::parse("  Alice \t").unwrap().as_str(), "Alice");
        assert!(UserName::parse(&"张".repeat(100)).is_ok());
        assert_eq!(
            UserName::parse(&"张".repeat(101)).unwrap_err().code,
            "too_long"
        );
        assert_eq!(UserName::parse("   ").unwrap_err().code, "too_short");
    }

    #[test]
    fn user_names_with_line_breaks_or_controls_are_refused() {
        for bad in [
            "Al\rice",
            "Al\nice",
            "A\u{0}",
            "A\u{7f}b",
            "A\u{2028}b",
            "\u{202E}evil\u{202C}",
            "Al\u{200E}ice",
        ] {
            assert_eq!(
                UserName::parse(bad).unwrap_err().code,
                "invalid_characters",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn user_names_need_a_visible_character() {
        for blank in [
            "\u{200B}",
            "\u{FEFF}",
            "\u{2800}",
            "\u{3164}",
            "\u{200B} \u{200D}",
        ] {
            assert_eq!(
                UserName::parse(blank).unwrap_err().code,
                "too_short",
                "{blank:?}"
            );
        }
        // Joiners inside a real name or an emoji sequence are fine.
        assert!(UserName::parse("👨\u{200D}👩\u{200D}👧").is_ok());
    }

    #[test]
    fn passwords_are_8_to_1024_characters() {
        assert!(Password::parse("12345678").is_ok());
        assert!(Password::parse(&"密".repeat(1024)).is_ok());
        assert_eq!(Password::parse("1234567").unwrap_err().code, "too_short");
        assert_eq!(
            Password::parse(&"x".repeat(1025)).unwrap_err().code,
            "too_long"
        );
    }

    #[test]
    fn a_password_never_shows_in_debug_output() {
        let password = Password::parse("correct horse battery").unwrap();
        assert!(!format!("{password:?}").contains("horse"));
    }

    #[test]
    fn email_addresses_are_checked_for_syntax_and_length() {
        for good in ["a@example.com", "a.b+c@mail.example.co", "x@a-b.io"] {
            assert!(EmailAddress::parse(good, "email").is_ok(), "{good}");
        }
        for bad in [
            "",
            "alice",
            "alice@",
            "@example.com",
            "alice@localhost",
            "al ice@example.com",
            "alice@exa_mple.com",
            "alice@-example.com",
            ".alice@example.com",
            "al..ice@example.com",
            "alice@example..com",
            "ålice@example.com",
            "alice@127.0.0.1",
        ] {
            let error = EmailAddress::parse(bad, "email").unwrap_err();
            assert_eq!(error.code, "invalid_email", "{bad:?}");
        }
        let long = format!("{}@{}.com", "a".repeat(64), "b".repeat(186));
        assert_eq!(long.len(), 255);
        assert_eq!(
            EmailAddress::parse(&long, "email").unwrap_err().code,
            "too_long"
        );
    }

    #[test]
    fn locales_are_en_or_zh_cn() {
        assert_eq!(parse_locale("en").unwrap(), Locale::English);
        assert_eq!(parse_locale("zh-CN").unwrap(), Locale::SimplifiedChinese);
        assert_eq!(parse_locale("zh-cn").unwrap(), Locale::SimplifiedChinese);
        assert_eq!(parse_locale("fr").unwrap_err().code, "unsupported_locale");
    }

    #[test]
    fn accept_language_picks_the_heavier_of_chinese_and_english() {
        use Locale::*;
        assert_eq!(
            preferred_locale("zh-CN,zh;q=0.9,en;q=0.8"),
            Some(SimplifiedChinese)
        );
        assert_eq!(preferred_locale("en-US,zh;q=0.5"), Some(English));
        assert_eq!(preferred_locale("fr, zh;q=0.3"), Some(SimplifiedChinese));
        assert_eq!(
            preferred_locale("en;q=0.2, zh-TW;q=0.4"),
            Some(SimplifiedChinese)
        );
        assert_eq!(preferred_locale("zh;q=0"), None);
        assert_eq!(preferred_locale("fr-FR"), None);
        assert_eq!(preferred_locale(""), None);
    }
}
