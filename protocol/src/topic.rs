//! MQTT topics (CONTRACT §1): building them, subscribing to them, and telling what a
//! received topic is about.
//!
//! The broker ACL lets agent X publish only under `calwatch/v1/agents/X/`, so the agent id
//! parsed from a topic is the authenticated sender; the gateway trusts it over the payload.

use std::fmt;

use crate::id::{Id, IdError};

const PREFIX: &str = "calwatch/v1/";

/// Subscription filter for every agent's reading batches.
pub const READINGS_FILTER: &str = "calwatch/v1/agents/+/readings";

/// Subscription filter for every agent's status (retained, plus last wills).
pub const STATUS_FILTER: &str = "calwatch/v1/agents/+/status";

/// Subscription filter for every alert event, for supervisors and tests.
pub const ALERTS_FILTER: &str = "calwatch/v1/alerts/#";

/// A calwatch topic, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Topic {
    /// `calwatch/v1/agents/{agent}/readings`
    Readings {
        /// The publishing agent.
        agent: Id,
    },
    /// `calwatch/v1/agents/{agent}/status`
    Status {
        /// The agent the status is about.
        agent: Id,
    },
    /// `calwatch/v1/alerts/{owner}/{device}`
    Alert {
        /// The device's owner.
        owner: Id,
        /// The device the alert is about.
        device: Id,
    },
}

impl Topic {
    /// Tells what a received topic is; anything not of the contract's shapes is an error.
    pub fn parse(topic: &str) -> Result<Topic, TopicError> {
        let Some(rest) = topic.strip_prefix(PREFIX) else {
            return Err(TopicError::Prefix {
                topic: topic.to_owned(),
            });
        };
        let mut segments = rest.split('/');
        let id = |segment: Option<&str>, name: &'static str| -> Result<Id, TopicError> {
            let segment = segment.ok_or_else(|| TopicError::Missing {
                topic: topic.to_owned(),
                segment: name,
            })?;
            Id::new(segment).map_err(|source| TopicError::InvalidId {
                topic: topic.to_owned(),
                segment: name,
                source,
            })
        };
        let parsed = match segments.next() {
            Some("agents") => {
                let agent = id(segments.next(), "{agent}")?;
                match segments.next() {
                    Some("readings") => Topic::Readings { agent },
                    Some("status") => Topic::Status { agent },
                    Some(_) => {
                        return Err(TopicError::Unexpected {
                            topic: topic.to_owned(),
                            position: 5,
                            expected: "`readings` or `status`",
                        })
                    }
                    None => {
                        return Err(TopicError::Missing {
                            topic: topic.to_owned(),
                            segment: "`readings` or `status`",
                        })
                    }
                }
            }
            Some("alerts") => Topic::Alert {
                owner: id(segments.next(), "{owner}")?,
                device: id(segments.next(), "{device}")?,
            },
            _ => {
                return Err(TopicError::Unexpected {
                    topic: topic.to_owned(),
                    position: 3,
                    expected: "`agents` or `alerts`",
                })
            }
        };
        if segments.next().is_some() {
            return Err(TopicError::Extra {
                topic: topic.to_owned(),
            });
        }
        Ok(parsed)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Topic::Readings { agent } => write!(f, "{PREFIX}agents/{agent}/readings"),
            Topic::Status { agent } => write!(f, "{PREFIX}agents/{agent}/status"),
            Topic::Alert { owner, device } => write!(f, "{PREFIX}alerts/{owner}/{device}"),
        }
    }
}

/// Where agent `agent` publishes reading batches.
pub fn readings_topic(agent: &Id) -> String {
    format!("{PREFIX}agents/{agent}/readings")
}

/// Where agent `agent` publishes its (retained) status and sets its last will.
pub fn status_topic(agent: &Id) -> String {
    format!("{PREFIX}agents/{agent}/status")
}

/// Where alert events about `device` of `owner` are published.
pub fn alert_topic(owner: &Id, device: &Id) -> String {
    format!("{PREFIX}alerts/{owner}/{device}")
}

/// A topic that is not one of the contract's; says which segment is wrong.
///
/// Segments are counted from 1 (`calwatch` is segment 1).
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    /// Does not start with `calwatch/v1/`.
    #[error("topic {}: does not start with `calwatch/v1/`", Quoted(.topic))]
    Prefix {
        /// The topic as received.
        topic: String,
    },
    /// A fixed segment has the wrong word.
    #[error("topic {}: segment {position} must be {expected}", Quoted(.topic))]
    Unexpected {
        /// The topic as received.
        topic: String,
        /// Which segment, counted from 1.
        position: usize,
        /// What the segment may be.
        expected: &'static str,
    },
    /// Ends before a required segment.
    #[error("topic {}: missing the {segment} segment", Quoted(.topic))]
    Missing {
        /// The topic as received.
        topic: String,
        /// The missing segment, e.g. `{device}`.
        segment: &'static str,
    },
    /// An `{agent}`, `{owner}` or `{device}` segment is not a valid [`Id`].
    #[error("topic {}: the {segment} segment: {source}", Quoted(.topic))]
    InvalidId {
        /// The topic as received.
        topic: String,
        /// Which segment, e.g. `{agent}`.
        segment: &'static str,
        /// What is wrong with it.
        source: IdError,
    },
    /// Has segments after the last one the contract defines.
    #[error("topic {}: extra segments after the end", Quoted(.topic))]
    Extra {
        /// The topic as received.
        topic: String,
    },
}

/// A topic quoted for a message, cut short when long (topics may be up to 64 KiB).
struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MAX: usize = 200;
        match self.0.char_indices().nth(MAX) {
            Some((cut, _)) => write!(f, "{:?}…", &self.0[..cut]),
            None => write!(f, "{:?}", self.0),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn id(s: &str) -> Id {
        Id::new(s).unwrap()
    }

    #[test]
    fn build_and_parse_round_trip() {
        let agent = id("station-17");
        let owner = id("sinopec-hs-17");
        let device = id("HS-DSP-0042");
        let cases = [
            (
                readings_topic(&agent),
                Topic::Readings {
                    agent: agent.clone(),
                },
            ),
            (
                status_topic(&agent),
                Topic::Status {
                    agent: agent.clone(),
                },
            ),
            (
                alert_topic(&owner, &device),
                Topic::Alert {
                    owner: owner.clone(),
                    device: device.clone(),
                },
            ),
        ];
        for (text, topic) in cases {
            assert_eq!(Topic::parse(&text).unwrap(), topic);
            assert_eq!(topic.to_string(), text);
        }
        assert_eq!(
            readings_topic(&agent),
            "calwatch/v1/agents/station-17/readings"
        );
        assert_eq!(status_topic(&agent), "calwatch/v1/agents/station-17/status");
        assert_eq!(
            alert_topic(&owner, &device),
            "calwatch/v1/alerts/sinopec-hs-17/HS-DSP-0042"
        );
    }

    #[test]
    fn filters_match_the_built_topics() {
        assert_eq!(READINGS_FILTER.replace('+', "x"), readings_topic(&id("x")));
        assert_eq!(STATUS_FILTER.replace('+', "x"), status_topic(&id("x")));
        assert!(alert_topic(&id("o"), &id("d")).starts_with(ALERTS_FILTER.trim_end_matches('#')));
    }

    #[test]
    fn wrong_prefix() {
        for t in [
            "calwatch/v2/agents/a/readings",
            "other/v1/agents/a/readings",
            "/calwatch/v1/agents/a/readings",
            "",
        ] {
            let e = Topic::parse(t).unwrap_err();
            assert!(matches!(e, TopicError::Prefix { .. }), "{t}: {e}");
            assert!(e.to_string().contains(&format!("{t:?}")), "{e}");
        }
    }

    #[test]
    fn bad_id_chars() {
        for (t, segment) in [
            ("calwatch/v1/agents/a b/readings", "{agent}"),
            ("calwatch/v1/agents/+/readings", "{agent}"),
            ("calwatch/v1/agents//status", "{agent}"),
            ("calwatch/v1/alerts/own#er/d", "{owner}"),
            ("calwatch/v1/alerts/o/dév", "{device}"),
        ] {
            let e = Topic::parse(t).unwrap_err();
            match &e {
                TopicError::InvalidId { segment: s, .. } => assert_eq!(*s, segment, "{t}"),
                other => panic!("{t}: {other}"),
            }
            let msg = e.to_string();
            assert!(
                msg.contains(segment) && msg.contains(&format!("{t:?}")),
                "{msg}"
            );
        }
    }

    #[test]
    fn sixty_five_char_id() {
        let long = "x".repeat(65);
        let e = Topic::parse(&format!("calwatch/v1/agents/{long}/readings")).unwrap_err();
        assert!(
            matches!(
                e,
                TopicError::InvalidId {
                    segment: "{agent}",
                    ..
                }
            ),
            "{e}"
        );
        let ok = "x".repeat(64);
        assert!(Topic::parse(&format!("calwatch/v1/agents/{ok}/readings")).is_ok());
    }

    #[test]
    fn extra_and_missing_segments() {
        for t in [
            "calwatch/v1/agents/a/readings/x",
            "calwatch/v1/agents/a/status/",
            "calwatch/v1/alerts/o/d/x",
        ] {
            let e = Topic::parse(t).unwrap_err();
            assert!(matches!(e, TopicError::Extra { .. }), "{t}: {e}");
        }
        for t in ["calwatch/v1/agents/a", "calwatch/v1/alerts/o"] {
            let e = Topic::parse(t).unwrap_err();
            assert!(matches!(e, TopicError::Missing { .. }), "{t}: {e}");
        }
    }

    #[test]
    fn unexpected_words() {
        let e = Topic::parse("calwatch/v1/agents/a/alerts").unwrap_err();
        assert!(
            matches!(e, TopicError::Unexpected { position: 5, .. }),
            "{e}"
        );
        let e = Topic::parse("calwatch/v1/devices/a/readings").unwrap_err();
        assert!(
            matches!(e, TopicError::Unexpected { position: 3, .. }),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            r#"topic "calwatch/v1/devices/a/readings": segment 3 must be `agents` or `alerts`"#
        );
    }

    #[test]
    fn long_topics_are_quoted_short() {
        let t = format!("nope/{}", "x".repeat(100_000));
        let msg = Topic::parse(&t).unwrap_err().to_string();
        assert!(msg.len() < 300, "{}", msg.len());
    }
}
