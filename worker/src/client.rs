//! The one HTTP client of cpt-server that `run` and `watch` share: the base URL and the bearer
//! token are written once, bodies are the protocol's types.

use std::time::Duration;

use anyhow::{bail, Result};
use serde::Serialize;
use serde_json::Value;

/// A cpt-server at `base`, reached with `token`.
#[derive(Clone)]
pub struct ServerClient {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl ServerClient {
    pub fn new(base: &str, token: Option<String>) -> Self {
        ServerClient { http: reqwest::Client::new(), base: base.trim_end_matches('/').to_string(), token }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// A request to `path` carrying the token.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// POSTs `body` until the server answers with anything but a 5xx, backing off up to 30 s
    /// between tries (the server restarting or its disk full is no reason to lose anything).
    pub async fn post_retrying(&self, path: &str, body: &impl Serialize) -> reqwest::Response {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.request(reqwest::Method::POST, path).json(body).send().await {
                Ok(response) if !response.status().is_server_error() => return response,
                Ok(response) => tracing::warn!(status = %response.status(), path, "server error; retrying"),
                Err(error) => tracing::warn!(%error, path, "server unreachable; retrying"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    /// `GET path`, refusing any answer but a success.
    pub async fn get(&self, path: &str) -> Result<reqwest::Response> {
        let response = self.request(reqwest::Method::GET, path).send().await?;
        if !response.status().is_success() {
            bail!("GET {path}: {} {}", response.status(), response.text().await.unwrap_or_default());
        }
        Ok(response)
    }

    /// `GET /v1/jobs/{id}`.
    pub async fn job(&self, id: &str) -> Result<Value> {
        Ok(self.get(&format!("/v1/jobs/{id}")).await?.json().await?)
    }
}
