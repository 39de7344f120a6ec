//! [`Upstreams`]: the pair of backends built from one config, and the one place that maps a
//! backend to the client that reaches it ([`Upstreams::http`]).

use std::sync::Arc;

use super::client::HttpUpstream;
use super::connect::Env;
use super::serverless::Serverless;
use super::tls::TlsError;
use crate::config::{Config, VastaiMode};
use crate::vocab::Backend;

/// How vastai is reached.
pub enum VastaiUpstream {
    /// `direct` and `instance` modes: plain HTTP(S) to a base URL.
    Http(Arc<HttpUpstream>),
    /// `serverless` mode: route, then call the worker with the wrapped payload.
    Serverless(Arc<Serverless>),
}

/// Both backends, built from one config.
pub struct Upstreams {
    pub legacy: Arc<HttpUpstream>,
    pub vastai: VastaiUpstream,
}

/// Why the upstreams of a config could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("[{side}] {source}")]
    Tls {
        side: &'static str,
        source: TlsError,
    },
}

impl Upstreams {
    /// The HTTP client of `backend`; `None` for vastai in Serverless mode, which is reached per
    /// request through its router instead.
    pub fn http(&self, backend: Backend) -> Option<&Arc<HttpUpstream>> {
        match (backend, &self.vastai) {
            (Backend::Legacy, _) => Some(&self.legacy),
            (Backend::Vastai, VastaiUpstream::Http(up)) => Some(up),
            (Backend::Vastai, VastaiUpstream::Serverless(_)) => None,
        }
    }

    /// Whether vastai is the Serverless mode (JSON POSTs only, payloads wrapped whole).
    pub fn serverless(&self) -> bool {
        matches!(self.vastai, VastaiUpstream::Serverless(_))
    }

    /// False while vastai has no address at all (a Vast.ai instance that is not running):
    /// trying it would only fail, so its share goes straight to legacy.
    pub fn vastai_addressable(&self) -> bool {
        match &self.vastai {
            VastaiUpstream::Http(up) => up.base().is_some(),
            VastaiUpstream::Serverless(_) => true,
        }
    }

    pub fn build(config: &Config, env: &Env) -> Result<Upstreams, BuildError> {
        let tls = |side| move |source| BuildError::Tls { side, source };
        let legacy_url = &config.legacy.url;
        let legacy = HttpUpstream::new(
            Backend::Legacy,
            Some(legacy_url.clone()),
            config.legacy.settings.clone(),
            None,
            legacy_url.is_https(),
        )
        .map_err(tls("legacy"))?;
        let vs = config.vastai.settings.clone();
        let key = vs
            .api_key_env
            .as_ref()
            .and_then(|name| env.get(name))
            .map(String::as_str);
        if let (Some(name), None) = (&vs.api_key_env, key) {
            tracing::warn!(variable = %name, "vastai.api_key_env names a variable that is not set");
        }
        let vastai = match &config.vastai.mode {
            VastaiMode::Direct { url } => {
                let up =
                    HttpUpstream::new(Backend::Vastai, Some(url.clone()), vs, key, url.is_https())
                        .map_err(tls("vastai"))?;
                VastaiUpstream::Http(Arc::new(up))
            }
            VastaiMode::Instance(i) => {
                let https = i.scheme == http::uri::Scheme::HTTPS;
                let up = HttpUpstream::new(Backend::Vastai, None, vs, key, https)
                    .map_err(tls("vastai"))?;
                VastaiUpstream::Http(Arc::new(up))
            }
            VastaiMode::Serverless(mode) => {
                let s = Serverless::new(mode, vs, key).map_err(tls("vastai"))?;
                VastaiUpstream::Serverless(Arc::new(s))
            }
        };
        Ok(Upstreams {
            legacy: Arc::new(legacy),
            vastai,
        })
    }
}
