//! A small client for the coordinator's HTTP API: status and body of each answer, never an
//! error for a 4xx/5xx (tests check those).

use anyhow::{Context, Result};

/// Calls one coordinator's API.
#[derive(Debug)]
pub struct ApiClient {
    base: String,
    agent: ureq::Agent,
}

/// Status and body of one answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub www_authenticate: Option<String>,
}

impl Answer {
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("answer {} is not JSON: {}", self.status, self.body))
    }
}

impl ApiClient {
    pub fn new(base: impl Into<String>) -> ApiClient {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(std::time::Duration::from_secs(30)))
            .http_status_as_error(false)
            .build()
            .into();
        ApiClient {
            base: base.into(),
            agent,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// GET `path`, with `Authorization: Bearer TOKEN` when a token is given.
    pub fn get(&self, path: &str, token: Option<&str>) -> Result<Answer> {
        let url = format!("{}{path}", self.base);
        let mut request = self.agent.get(&url);
        if let Some(t) = token {
            request = request.header("Authorization", format!("Bearer {t}"));
        }
        let response = request.call().with_context(|| format!("GET {url}"))?;
        answer(response, &url)
    }

    /// POST `body` (sent as JSON) to `path`.
    pub fn post(&self, path: &str, token: Option<&str>, body: &str) -> Result<Answer> {
        let url = format!("{}{path}", self.base);
        let mut request = self
            .agent
            .post(&url)
            .header("Content-Type", "application/json");
        if let Some(t) = token {
            request = request.header("Authorization", format!("Bearer {t}"));
        }
        let response = request
            .send(body.as_bytes())
            .with_context(|| format!("POST {url}"))?;
        answer(response, &url)
    }

    /// POST raw `body` (`application/octet-stream`, a deployment package file) to `path`.
    pub fn post_bytes(&self, path: &str, token: Option<&str>, body: &[u8]) -> Result<Answer> {
        let url = format!("{}{path}", self.base);
        let mut request = self
            .agent
            .post(&url)
            .header("Content-Type", "application/octet-stream");
        if let Some(t) = token {
            request = request.header("Authorization", format!("Bearer {t}"));
        }
        let response = request.send(body).with_context(|| format!("POST {url}"))?;
        answer(response, &url)
    }
}

fn answer(mut response: ureq::http::Response<ureq::Body>, url: &str) -> Result<Answer> {
    let status = response.status().as_u16();
    let www_authenticate = response
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response
        .body_mut()
        .with_config()
        .limit(64 * 1024 * 1024)
        .read_to_string()
        .with_context(|| format!("cannot read the answer from {url}"))?;
    Ok(Answer {
        status,
        body,
        www_authenticate,
    })
}

/// A token and the `[[api.tokens]]` table that admits it, as `edge-coordinator api-token`
/// prints them (sha256 hex of the token).
pub fn token_table(name: &str, token: &str, scope: &str) -> toml::Table {
    use sha2::{Digest, Sha256};
    let digest: String = Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut t = toml::Table::new();
    t.insert("name".into(), name.into());
    t.insert("sha256".into(), digest.into());
    t.insert("scope".into(), scope.into());
    t
}

/// Starts a coordinator (embedded broker) in `dir` whose `[api]` section, written to
/// `dir/config_name`, holds a read token `viewer` (`read`), an admin token `ops` (`admin`) and
/// the `extra` keys.
pub fn start_with_tokens(
    dir: &std::path::Path,
    config_name: &str,
    read: &str,
    admin: &str,
    extra: toml::Table,
) -> Result<crate::Coordinator> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let config = dir.join(config_name);
    let mut api = extra;
    api.insert(
        "tokens".into(),
        toml::Value::Array(vec![
            token_table("viewer", read, "read").into(),
            token_table("ops", admin, "admin").into(),
        ]),
    );
    let mut root = toml::Table::new();
    root.insert("api".into(), api.into());
    std::fs::write(&config, toml::to_string(&root)?)
        .with_context(|| format!("cannot write {}", config.display()))?;
    crate::Coordinator::start_embedded_with_args(
        dir,
        vec!["--config".into(), config.display().to_string()],
    )
}
