//! The words every part of vastshift shares: the two backends, why an upstream call failed, the
//! hop-by-hop fields, and the wall clock as written in documents. Imports nothing from the rest of the crate, so any
//! module may use it without an arrow climbing back up.

/// The two sides of the migration. Spelled `legacy` and `vastai` everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    Legacy,
    Vastai,
}

impl Backend {
    pub const ALL: [Backend; 2] = [Backend::Legacy, Backend::Vastai];

    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Legacy => "legacy",
            Backend::Vastai => "vastai",
        }
    }

    pub fn other(self) -> Backend {
        match self {
            Backend::Legacy => Backend::Vastai,
            Backend::Vastai => Backend::Legacy,
        }
    }

    pub fn parse(s: &str) -> Option<Backend> {
        match s {
            "legacy" => Some(Backend::Legacy),
            "vastai" => Some(Backend::Vastai),
            _ => None,
        }
    }

    /// 0 for legacy, 1 for vastai: the index of per-backend arrays.
    pub fn index(self) -> usize {
        match self {
            Backend::Legacy => 0,
            Backend::Vastai => 1,
        }
    }
}

/// Why an upstream call failed, as the `kind` label of `vastshift_upstream_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Connect,
    Timeout,
    Reset,
    Other,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Reset => "reset",
            ErrorKind::Other => "other",
        }
    }
}

/// The current wall-clock time, RFC 3339 in UTC, as the audit log and documents write it.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// The hop-by-hop fields every message loses (RFC 9110 §7.6.1), by lowercase name, besides the
/// ones `Connection` names.
pub const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether a field name, in any case, is one of [`HOP_BY_HOP`].
pub fn is_hop_by_hop_name(name: &[u8]) -> bool {
    // Most names are settled by their length alone.
    matches!(name.len(), 2 | 7 | 10 | 16 | 17)
        && HOP_BY_HOP
            .iter()
            .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for b in Backend::ALL {
            assert_eq!(Backend::parse(b.as_str()), Some(b));
            assert_eq!(b.other().other(), b);
            assert_eq!(Backend::ALL[b.index()], b);
        }
        assert_eq!(Backend::parse("Legacy"), None);
    }
}

/// Why a request vastai was chosen for went to legacy because vastai had no capacity (SPEC §12):
/// not a failure, and not a vastai request for the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spill {
    /// vastai answered 429 (a worker's queue is full).
    RateLimited,
    /// The Serverless router had no ready worker within `max_wait_secs`, or the endpoint is cold.
    NoWorker,
    /// The Vast.ai instance is not running.
    InstanceDown,
    /// vastai is marked unhealthy.
    Unhealthy,
}

impl Spill {
    pub const ALL: [Spill; 4] = [
        Spill::RateLimited,
        Spill::NoWorker,
        Spill::InstanceDown,
        Spill::Unhealthy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Spill::RateLimited => "rate_limited",
            Spill::NoWorker => "no_worker",
            Spill::InstanceDown => "instance_down",
            Spill::Unhealthy => "unhealthy",
        }
    }
}
