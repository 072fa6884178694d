//! The welcome email, in English and Simplified Chinese.
//!
//! Names are user input: the HTML part escapes them, and the headers are
//! encoded by the message builder, so a name can change neither markup nor
//! headers.

use contracts::Locale;

/// The parts of one welcome email.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub subject: String,
    pub text: String,
    pub html: String,
}

impl Welcome {
    pub fn render(user_name: &str, user_id: &str, locale: Locale) -> Self {
        let html_name = escape_html(user_name);
        let html_id = escape_html(user_id);
        match locale {
            Locale::English => Welcome {
                subject: format!("Welcome to herald, {user_name}!"),
                text: format!(
                    "Hello {user_name},\n\n\
                     Welcome to herald! Your account {user_id} is ready.\n\n\
                     The herald team\n"
                ),
                html: page(
                    "en",
                    &format!("Hello {html_name},"),
                    &format!(
                        "Welcome to herald! Your account \
                         <strong>{html_id}</strong> is ready."
                    ),
                    "The herald team",
                ),
            },
            Locale::SimplifiedChinese => Welcome {
                subject: format!("欢迎加入 herald，{user_name}！"),
                text: format!(
                    "{user_name}，您好！\n\n\
                     欢迎加入 herald！您的账户 {user_id} 已经创建成功。\n\n\
                     herald 团队\n"
                ),
                html: page(
                    "zh-CN",
                    &format!("{html_name}，您好！"),
                    &format!(
                        "欢迎加入 herald！您的账户 \
                         <strong>{html_id}</strong> 已经创建成功。"
                    ),
                    "herald 团队",
                ),
            },
        }
    }
}

fn page(lang: &str, greeting: &str, body: &str, signature: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"{lang}\">\n<head>\
         <meta charset=\"utf-8\"></head>\n<body>\n\
         <p>{greeting}</p>\n<p>{body}</p>\n<p>{signature}</p>\n\
         </body>\n</html>\n"
    )
}

fn escape_html(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_english_welcome_greets_the_user_by_name() {
        let mail = Welcome::render("Alice", "alice", Locale::English);
        assert_eq!(mail.subject, "Welcome to herald, Alice!");
        assert!(mail.text.starts_with("Hello Alice,"));
        assert!(mail.html.contains("Hello Alice,"));
    }

    #[test]
    fn the_chinese_welcome_is_in_chinese() {
        let mail =
            Welcome::render("张伟", "zhangwei", Locale::SimplifiedChinese);
        assert_eq!(mail.subject, "欢迎加入 herald，张伟！");
        assert!(mail.text.contains("张伟，您好"));
        assert!(mail.html.contains("lang=\"zh-CN\""));
    }

    #[test]
    fn a_name_cannot_add_markup() {
        let mail = Welcome::render("<b>Eve</b>", "eve", Locale::English);
        assert!(mail.html.contains("&lt;b&gt;Eve&lt;/b&gt;"));
        assert!(!mail.html.contains("<b>Eve"));
    }
}
