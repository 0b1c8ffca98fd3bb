//! Configuration is read by clap from environment variables (and flags); this module makes a
//! failure name the variable, e.g. `DATABASE_MAX_CONNECTIONS=abc: invalid digit found in string`.

use std::error::Error as _;
use std::str::FromStr;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::Parser;
use sqlx::postgres::PgConnectOptions;

/// Parses `T` from the process's arguments and environment. A bad or missing setting ends
/// the process with exit code 2 and one line per problem naming the environment variable.
pub fn parse_or_exit<T: Parser>() -> T {
    match try_parse_from(std::env::args_os()) {
        Ok(parsed) => parsed,
        Err(ParseFailure::Clap(err)) => err.exit(),
        Err(ParseFailure::Config(message)) => {
            // Logging is not set up before the configuration is known.
            #[allow(clippy::print_stderr)]
            {
                eprintln!("configuration error: {message}");
            }
            std::process::exit(2)
        }
    }
}

/// The outcome of a failed parse.
#[derive(Debug)]
pub enum ParseFailure {
    /// Help, version or a command-line usage error: clap prints it as usual.
    Clap(clap::Error),
    /// A setting is missing or invalid; the message names its environment variable.
    Config(String),
}

/// Parses `T` from the given arguments (and the environment), naming environment variables
/// in errors.
pub fn try_parse_from<T, I, S>(args: I) -> Result<T, ParseFailure>
where
    T: Parser,
    I: IntoIterator<Item = S>,
    S: Into<std::ffi::OsString> + Clone,
{
    let mut command = T::command();
    let matches = command
        .try_get_matches_from_mut(args)
        .map_err(|err| describe(&command, err))?;
    T::from_arg_matches(&matches).map_err(|err| describe(&command, err))
}

fn describe(command: &clap::Command, err: clap::Error) -> ParseFailure {
    let args: Vec<String> = match err.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(arg)) => vec![arg.clone()],
        Some(ContextValue::Strings(args)) => args.clone(),
        _ => Vec::new(),
    };
    let found: Vec<(String, bool)> = args.iter().filter_map(|arg| env_of(command, arg)).collect();
    let secret = found.iter().any(|(_, hidden)| *hidden);
    let envs: Vec<String> = found.into_iter().map(|(env, _)| env).collect();
    if envs.is_empty() {
        return ParseFailure::Clap(err);
    }
    match err.kind() {
        ErrorKind::MissingRequiredArgument => ParseFailure::Config(format!(
            "missing required environment variable {}",
            envs.join(", ")
        )),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation => {
            let value = match err.get(ContextKind::InvalidValue) {
                // A secret (e.g. a URL with a password) is never echoed.
                _ if secret => "<hidden>".to_owned(),
                Some(ContextValue::String(value)) => format!("{value:?}"),
                _ => String::new(),
            };
            let reason = err
                .source()
                .map(ToString::to_string)
                .or_else(|| match err.get(ContextKind::ValidValue) {
                    Some(ContextValue::Strings(valid)) => {
                        Some(format!("expected one of: {}", valid.join(", ")))
                    }
                    _ => None,
                })
                .unwrap_or_else(|| "invalid value".to_owned());
            ParseFailure::Config(format!("{}={value}: {reason}", envs.join(", ")))
        }
        _ => ParseFailure::Clap(err),
    }
}

/// The environment variable behind an argument as clap prints it (`--port <PORT>`), and
/// whether its values are secret (`hide_env_values`), searching subcommands too.
fn env_of(command: &clap::Command, printed: &str) -> Option<(String, bool)> {
    for arg in command.get_arguments() {
        if arg.to_string() == printed || printed.starts_with(&format!("--{}", arg.get_id())) {
            if let Some(env) = arg.get_env() {
                return Some((
                    env.to_string_lossy().into_owned(),
                    arg.is_hide_env_values_set(),
                ));
            }
        }
    }
    command
        .get_subcommands()
        .find_map(|sub| env_of(sub, printed))
}

/// The database URL; its `Debug` hides the password.
#[derive(Clone)]
pub struct DatabaseUrl(pub PgConnectOptions);

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "postgres://{}@{}:{}/{}",
            self.0.get_username(),
            self.0.get_host(),
            self.0.get_port(),
            self.0.get_database().unwrap_or_default()
        )
    }
}

/// Parses a `postgres://` URL (for `value_parser`).
pub fn parse_database_url(value: &str) -> Result<DatabaseUrl, String> {
    if !(value.starts_with("postgres://") || value.starts_with("postgresql://")) {
        return Err("must be a postgres:// or postgresql:// URL".into());
    }
    PgConnectOptions::from_str(value)
        .map(DatabaseUrl)
        .map_err(|err| err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Parser)]
    struct Settings {
        /// A port.
        #[arg(long, env = "PLATFORM_TEST_PORT", default_value_t = 80)]
        port: u16,
        /// A required URL.
        #[arg(long, env = "PLATFORM_TEST_URL")]
        url: String,
    }

    #[test]
    fn a_bad_value_names_its_environment_variable() {
        let failure =
            try_parse_from::<Settings, _, _>(["x", "--url", "u", "--port", "seventy"]).unwrap_err();
        let ParseFailure::Config(message) = failure else {
            panic!("expected a configuration error, got {failure:?}");
        };
        assert!(
            message.starts_with("PLATFORM_TEST_PORT=\"seventy\""),
            "{message}"
        );
    }

    #[test]
    fn a_missing_value_names_its_environment_variable() {
        let failure = try_parse_from::<Settings, _, _>(["x"]).unwrap_err();
        let ParseFailure::Config(message) = failure else {
            panic!("expected a configuration error, got {failure:?}");
        };
        assert_eq!(
            message,
            "missing required environment variable PLATFORM_TEST_URL"
        );
    }
}
