//! The `config_keys!` macro, which turns the one table of keys in the parent
//! module into `Config`, `RunArgs` and `Layer`, and the helpers its expansion
//! calls to read one key from a flag or an environment variable.
//!
//! The table itself stays in the parent, next to the module documentation
//! that describes the layers, so that a new key is added where it is read
//! about. The macro names its helpers here by path, so the parent imports
//! nothing for them.

use std::path::PathBuf;

use super::error::{invalid, ConfigError};

/// Declares every key of [`Config`](super::Config) once: each row of the
/// table in the parent module generates the `Config` field, the `RunArgs`
/// flag, the `Layer` field that the file, the environment and the flags are
/// read into, the merge and the default. A key written in seven places could
/// be added to one layer and forgotten in another; here it cannot.
///
/// A row, after the field's doc comment and any `#[serde]` attribute for
/// `Config`:
///
/// - `default: EXPR`, used when no layer sets the key. It may read the keys
///   declared above it (they are bound by then) and return an error with `?`.
///   A row without `default` is required.
/// - `flag: TYPE, VALUE_NAME, HELP`: the `--key-name` flag as clap reads it.
///   ` [env: NAME]` is appended to HELP, so the help cannot name another
///   variable than the one read.
/// - `parse: FN` for a key whose flag and variable are text in a syntax of
///   their own (`fn(&str) -> Result<T, String>`, with flag type `String`), so
///   that their errors name the key like every other. Without it clap parses
///   the flag and [`FromEnvText`] the variable.
/// - `env: "COREKV_KEY"`, optionally `then "OTHER"`: the variables read, in
///   that order.
macro_rules! config_keys {
    (
        $(
            $(#[$attr:meta])*
            $key:ident: $ty:ty {
                $(default: $default:expr,)?
                flag: $flag_ty:ident, $value_name:expr, $help:literal,
                $(parse: $parse:expr,)?
                env: $env:literal $(then $fallback:literal)?,
            }
        )*
    ) => {
        /// The settings of one corekv node, after all layers are merged and validated.
        ///
        /// Built by [`Config::load`] (for `corekv run`) or [`Config::from_toml_str`];
        /// both validate, so code that receives a `Config` can rely on
        /// [`Config::validate`]'s rules.
        #[derive(Clone, Debug, PartialEq, Serialize)]
        pub struct Config {
            $(
                $(#[$attr])*
                pub $key: $ty,
            )*
        }

        /// Flags of `corekv run`. Every key is optional here: unset keys fall back to
        /// the environment, then the config file, then the default (see the module
        /// documentation). Environment variables are read by [`Config::load`], not by
        /// clap, so that tests can inject them.
        #[derive(clap::Args, Clone, Debug, Default, PartialEq, Eq)]
        pub struct RunArgs {
            /// TOML config file; its keys are the flag names in snake_case [env: COREKV_CONFIG]
            #[arg(long, value_name = "FILE")]
            pub config: Option<PathBuf>,
            $(
                #[arg(
                    long,
                    value_name = $value_name,
                    help = concat!($help, " [env: ", $env, $(", then ", $fallback,)? "]"),
                )]
                pub $key: Option<$flag_ty>,
            )*
        }

        /// One configuration layer: every key optional. The file is parsed straight
        /// into this type, so a key the file may not contain is refused by name.
        #[derive(Clone, Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Layer {
            $($key: Option<$ty>,)*
        }

        impl Layer {
            /// Key by key, `self` wins where it has a value and `lower` fills the rest.
            fn over(self, lower: Layer) -> Layer {
                Layer {
                    $($key: self.$key.or(lower.$key),)*
                }
            }

            /// The flag layer.
            fn from_args(args: &RunArgs) -> Result<Layer, ConfigError> {
                let args = args.clone();
                Ok(Layer {
                    $($key: config_keys!(@flag $key, args.$key, [$($parse)?]),)*
                })
            }

            /// The environment layer.
            fn from_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Layer, ConfigError> {
                Ok(Layer {
                    $(
                        $key: $crate::config::keys::env_with(
                            env,
                            stringify!($key),
                            &[$env $(, $fallback)?],
                            config_keys!(@env_parse $ty, [$($parse)?]),
                        )?,
                    )*
                })
            }

            /// Gives every key no layer set its default, in table order so that a
            /// default can use the keys above it.
            fn into_config(self) -> Result<Config, ConfigError> {
                let Layer { $($key,)* } = self;
                $(
                    let $key: $ty = config_keys!(@or_default $key, $env, [$($default)?]);
                )*
                Ok(Config { $($key,)* })
            }
        }

        /// The names of every key, for the tests that hold the README to the table.
        #[cfg(test)]
        const KEYS: &[$crate::config::keys::KeyNames] = &[
            $(
                $crate::config::keys::KeyNames {
                    key: stringify!($key),
                    env: &[$env $(, $fallback)?],
                },
            )*
        ];
    };

    (@flag $key:ident, $flag:expr, []) => { $flag };
    (@flag $key:ident, $flag:expr, [$parse:expr]) => {
        $crate::config::keys::flag_with(stringify!($key), $flag, $parse)?
    };

    (@env_parse $ty:ty, []) => { <$ty as $crate::config::keys::FromEnvText>::from_env_text };
    (@env_parse $ty:ty, [$parse:expr]) => { $parse };

    (@or_default $key:ident, $env:literal, []) => {
        match $key {
            Some(value) => value,
            None => return Err($crate::config::keys::missing(stringify!($key), $env)),
        }
    };
    (@or_default $key:ident, $env:literal, [$default:expr]) => {
        match $key {
            Some(value) => value,
            None => $default,
        }
    };
}

pub(super) use config_keys;

/// The names of one key of the table.
#[cfg(test)]
pub(super) struct KeyNames {
    /// As written in the config file.
    pub(super) key: &'static str,
    /// The environment variables read, in order.
    pub(super) env: &'static [&'static str],
}

/// How a key without a `parse` hook reads its environment variable: a number
/// as clap reads its flag (trimmed, as a variable often carries stray spaces),
/// text exactly as written.
pub(super) trait FromEnvText: Sized {
    fn from_env_text(text: &str) -> Result<Self, String>;
}

impl FromEnvText for String {
    fn from_env_text(text: &str) -> Result<Self, String> {
        Ok(text.to_string())
    }
}

impl FromEnvText for PathBuf {
    fn from_env_text(text: &str) -> Result<Self, String> {
        Ok(PathBuf::from(text))
    }
}

macro_rules! numbers_from_env_text {
    ($($number:ty),*) => {$(
        impl FromEnvText for $number {
            fn from_env_text(text: &str) -> Result<Self, String> {
                text.trim().parse().map_err(|_| {
                    format!(
                        "expected an unsigned integer that fits {}",
                        std::any::type_name::<Self>()
                    )
                })
            }
        }
    )*};
}

numbers_from_env_text!(u16, u32, u64, usize);

pub(super) fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|value| !value.trim().is_empty())
}

/// Reads `key` from the first of the variables `names` that is set.
pub(super) fn env_with<T>(
    env: &dyn Fn(&str) -> Option<String>,
    key: &'static str,
    names: &[&str],
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, ConfigError> {
    let Some((name, text)) = names
        .iter()
        .find_map(|name| non_empty(env(name)).map(|text| (name, text)))
    else {
        return Ok(None);
    };
    match parse(&text) {
        Ok(value) => Ok(Some(value)),
        Err(reason) => Err(ConfigError::Parse {
            key,
            origin: format!("env {name}"),
            value: text,
            reason,
        }),
    }
}

/// Parses the flag for `key` (`--key-name`) if it was given.
pub(super) fn flag_with<T>(
    key: &'static str,
    text: Option<String>,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, ConfigError> {
    let Some(text) = text else {
        return Ok(None);
    };
    parse(&text).map(Some).map_err(|reason| ConfigError::Parse {
        key,
        origin: format!("flag --{}", key.replace('_', "-")),
        value: text,
        reason,
    })
}

/// A required key that no layer set; the message names every place to set it.
pub(super) fn missing(key: &'static str, env_name: &str) -> ConfigError {
    invalid(
        key,
        format!(
            "is required (flag --{}, env {env_name}, or `{key}` in the config file)",
            key.replace('_', "-")
        ),
    )
}
