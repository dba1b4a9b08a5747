//! Loading TOML configuration files with errors that name `file:line`.
//!
//! Shared by the agent (agent.toml, profiles) and the gateway (gateway.toml) so every
//! configuration error reads the same way to an operator.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A configuration file that could not be read or understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file at fault.
    pub file: PathBuf,
    /// 1-based line, when the fault has a place in the file.
    pub line: Option<usize>,
    /// What is wrong, in words an operator can act on.
    pub message: String,
}

impl ConfigError {
    /// An error at a byte offset of `text` (converted to a line number).
    pub fn at_offset(file: &Path, text: &str, offset: usize, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            line: Some(line_of(text, offset)),
            message: message.into(),
        }
    }

    /// An error about the file as a whole.
    pub fn whole(file: &Path, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            line: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// 1-based line number of a byte offset.
pub fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Reads and deserializes a TOML file. Returns the text too, so callers can place
/// their own validation errors (through `toml::Spanned` offsets) on a line.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<(T, String), ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::whole(path, format!("cannot read: {e}")))?;
    let value = parse(path, &text)?;
    Ok((value, text))
}

/// Deserializes TOML text that came from `path`.
pub fn parse<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let message = e.message().trim().to_string();
        match e.span() {
            Some(span) => ConfigError::at_offset(path, text, span.start, message),
            None => ConfigError::whole(path, message),
        }
    })
}

/// Resolves a path written inside a config file: relative paths are relative to that file.
pub fn resolve(config_file: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        config_file
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        name: String,
        count: u32,
    }

    #[test]
    fn unknown_key_names_file_and_line() {
        let text = "name = \"a\"\ncount = 1\ncolour = 3\n";
        let err = parse::<Sample>(Path::new("x.toml"), text).unwrap_err();
        assert_eq!(err.line, Some(3));
        let shown = err.to_string();
        assert!(shown.starts_with("x.toml:3: "), "{shown}");
        assert!(shown.contains("colour"), "{shown}");
    }

    #[test]
    fn wrong_type_names_line() {
        let text = "name = \"a\"\n\ncount = \"many\"\n";
        let err = parse::<Sample>(Path::new("x.toml"), text).unwrap_err();
        assert_eq!(err.line, Some(3), "{err}");
    }

    #[test]
    fn relative_paths_follow_the_file() {
        assert_eq!(
            resolve(
                Path::new("/etc/calwatch/agent.toml"),
                Path::new("profiles/a.toml")
            ),
            PathBuf::from("/etc/calwatch/profiles/a.toml")
        );
        assert_eq!(
            resolve(Path::new("agent.toml"), Path::new("/abs")),
            PathBuf::from("/abs")
        );
    }
}
