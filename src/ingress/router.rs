//! (method, path) to a [`Route`]. Routes double as metric labels.

use super::parse::Method;
use crate::error::ApiError;

/// Every endpoint, plus the outcomes that have no endpoint (for metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Route {
    /// GET /health
    Health,
    /// GET /health/live
    Live,
    /// GET /health/ready
    Ready,
    /// GET /metrics
    Metrics,
    /// GET /openapi.json
    OpenApi,
    /// POST /api/keys/generate
    KeysGenerate,
    /// GET /api/keys
    KeysInfo,
    /// POST /api/keys/rotate
    KeysRotate,
    /// POST /api/webhook/config
    WebhookSet,
    /// DELETE /api/webhook/config
    WebhookDelete,
    /// POST /api/events
    EventsCreate,
    /// POST /api/events/batch
    EventsBatch,
    /// GET /api/events/{id}
    EventGet,
    /// POST /api/events/{id}/redeliver
    EventRedeliver,
    /// GET /api/inbox
    Inbox,
    /// POST /api/ack/{event_id} (and /api/inbox/ack/{event_id})
    Ack,
    /// POST /api/ack (and /api/inbox/ack)
    AckBatch,
    /// POST /api/endpoints
    EndpointsCreate,
    /// GET /api/endpoints
    EndpointsList,
    /// GET /api/endpoints/{id}
    EndpointGet,
    /// PATCH /api/endpoints/{id}
    EndpointPatch,
    /// DELETE /api/endpoints/{id}
    EndpointDelete,
    /// GET /api/endpoints/{id}/secret
    EndpointSecret,
    /// POST /api/endpoints/{id}/secret/rotate
    EndpointRotate,
    /// POST /api/endpoints/{id}/pause
    EndpointPause,
    /// POST /api/endpoints/{id}/resume
    EndpointResume,
    /// POST /api/endpoints/{id}/recover
    EndpointRecover,
    /// GET /api/endpoints/{id}/failed
    EndpointFailed,
    /// No such path.
    NotFound,
    /// A known path with another method.
    MethodNotAllowed,
    /// The request could not be parsed.
    BadRequest,
}

impl Route {
    /// Number of routes, for per-route arrays.
    pub const COUNT: usize = Route::BadRequest as usize + 1;

    /// Every route, in index order.
    pub const ALL: [Route; Route::COUNT] = [
        Route::Health,
        Route::Live,
        Route::Ready,
        Route::Metrics,
        Route::OpenApi,
        Route::KeysGenerate,
        Route::KeysInfo,
        Route::KeysRotate,
        Route::WebhookSet,
        Route::WebhookDelete,
        Route::EventsCreate,
        Route::EventsBatch,
        Route::EventGet,
        Route::EventRedeliver,
        Route::Inbox,
        Route::Ack,
        Route::AckBatch,
        Route::EndpointsCreate,
        Route::EndpointsList,
        Route::EndpointGet,
        Route::EndpointPatch,
        Route::EndpointDelete,
        Route::EndpointSecret,
        Route::EndpointRotate,
        Route::EndpointPause,
        Route::EndpointResume,
        Route::EndpointRecover,
        Route::EndpointFailed,
        Route::NotFound,
        Route::MethodNotAllowed,
        Route::BadRequest,
    ];

    /// Whether the route needs an API key (everything but operations and key generation).
    pub fn needs_key(self) -> bool {
        !matches!(
            self,
            Route::Health
                | Route::Live
                | Route::Ready
                | Route::Metrics
                | Route::OpenApi
                | Route::KeysGenerate
                | Route::NotFound
                | Route::MethodNotAllowed
                | Route::BadRequest
        )
    }

    /// The metric labels of every route, by index.
    pub const LABELS: [(&'static str, &'static str); Route::COUNT] = {
        let mut labels = [("", ""); Route::COUNT];
        let mut i = 0;
        while i < Route::COUNT {
            labels[i] = Route::ALL[i].labels();
            i += 1;
        }
        labels
    };

    /// (method, path template) labels for metrics.
    pub const fn labels(self) -> (&'static str, &'static str) {
        match self {
            Route::Health => ("GET", "/health"),
            Route::Live => ("GET", "/health/live"),
            Route::Ready => ("GET", "/health/ready"),
            Route::Metrics => ("GET", "/metrics"),
            Route::OpenApi => ("GET", "/openapi.json"),
            Route::KeysGenerate => ("POST", "/api/keys/generate"),
            Route::KeysInfo => ("GET", "/api/keys"),
            Route::KeysRotate => ("POST", "/api/keys/rotate"),
            Route::WebhookSet => ("POST", "/api/webhook/config"),
            Route::WebhookDelete => ("DELETE", "/api/webhook/config"),
            Route::EventsCreate => ("POST", "/api/events"),
            Route::EventsBatch => ("POST", "/api/events/batch"),
            Route::EventGet => ("GET", "/api/events/{id}"),
            Route::EventRedeliver => ("POST", "/api/events/{id}/redeliver"),
            Route::Inbox => ("GET", "/api/inbox"),
            Route::Ack => ("POST", "/api/ack/{event_id}"),
            Route::AckBatch => ("POST", "/api/ack"),
            Route::EndpointsCreate => ("POST", "/api/endpoints"),
            Route::EndpointsList => ("GET", "/api/endpoints"),
            Route::EndpointGet => ("GET", "/api/endpoints/{id}"),
            Route::EndpointPatch => ("PATCH", "/api/endpoints/{id}"),
            Route::EndpointDelete => ("DELETE", "/api/endpoints/{id}"),
            Route::EndpointSecret => ("GET", "/api/endpoints/{id}/secret"),
            Route::EndpointRotate => ("POST", "/api/endpoints/{id}/secret/rotate"),
            Route::EndpointPause => ("POST", "/api/endpoints/{id}/pause"),
            Route::EndpointResume => ("POST", "/api/endpoints/{id}/resume"),
            Route::EndpointRecover => ("POST", "/api/endpoints/{id}/recover"),
            Route::EndpointFailed => ("GET", "/api/endpoints/{id}/failed"),
            Route::NotFound => ("", "unmatched"),
            Route::MethodNotAllowed => ("", "method_not_allowed"),
            Route::BadRequest => ("", "bad_request"),
        }
    }
}

/// A matched route and its path parameter, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Matched<'p> {
    /// The route.
    pub route: Route,
    /// The `{id}` segment.
    pub param: Option<&'p str>,
}

/// Match a request. Unknown paths are 404, known paths with the wrong method 405.
pub fn route(method: Method, path: &str) -> Result<Matched<'_>, ApiError> {
    let path = if path.len() > 1 {
        path.strip_suffix('/').unwrap_or(path)
    } else {
        path
    };
    let mut segments = path.split('/').skip(1);
    let parts: [Option<&str>; 5] = std::array::from_fn(|_| segments.next());
    if segments.next().is_some() {
        return Err(ApiError::NotFound("no such endpoint"));
    }
    use Method::{Delete, Get, Patch, Post};
    let (allow, found): (&'static str, Option<(Route, Option<&str>)>) = match parts {
        [Some("health"), None, ..] => ("GET", (method == Get).then_some((Route::Health, None))),
        [Some("health"), Some("live"), None, ..] => {
            ("GET", (method == Get).then_some((Route::Live, None)))
        }
        [Some("health"), Some("ready"), None, ..] => {
            ("GET", (method == Get).then_some((Route::Ready, None)))
        }
        [Some("metrics"), None, ..] => ("GET", (method == Get).then_some((Route::Metrics, None))),
        [Some("openapi.json"), None, ..] => {
            ("GET", (method == Get).then_some((Route::OpenApi, None)))
        }
        [Some("api"), Some("keys"), None, ..] => {
            ("GET", (method == Get).then_some((Route::KeysInfo, None)))
        }
        [Some("api"), Some("keys"), Some("generate"), None, _] => (
            "POST",
            (method == Post).then_some((Route::KeysGenerate, None)),
        ),
        [Some("api"), Some("keys"), Some("rotate"), None, _] => (
            "POST",
            (method == Post).then_some((Route::KeysRotate, None)),
        ),
        [Some("api"), Some("webhook"), Some("config"), None, _] => (
            "POST, DELETE",
            match method {
                Post => Some((Route::WebhookSet, None)),
                Delete => Some((Route::WebhookDelete, None)),
                _ => None,
            },
        ),
        [Some("api"), Some("events"), None, ..] => (
            "POST",
            (method == Post).then_some((Route::EventsCreate, None)),
        ),
        [Some("api"), Some("events"), Some("batch"), None, _] => (
            "POST",
            (method == Post).then_some((Route::EventsBatch, None)),
        ),
        [Some("api"), Some("events"), Some(id), None, _] => (
            "GET",
            (method == Get).then_some((Route::EventGet, Some(id))),
        ),
        [Some("api"), Some("events"), Some(id), Some("redeliver"), None] => (
            "POST",
            (method == Post).then_some((Route::EventRedeliver, Some(id))),
        ),
        [Some("api"), Some("inbox"), None, ..] => {
            ("GET", (method == Get).then_some((Route::Inbox, None)))
        }
        [Some("api"), Some("ack"), None, ..]
        | [Some("api"), Some("inbox"), Some("ack"), None, _] => {
            ("POST", (method == Post).then_some((Route::AckBatch, None)))
        }
        [Some("api"), Some("ack"), Some(id), None, _]
        | [Some("api"), Some("inbox"), Some("ack"), Some(id), None] => {
            ("POST", (method == Post).then_some((Route::Ack, Some(id))))
        }
        [Some("api"), Some("endpoints"), None, ..] => (
            "GET, POST",
            match method {
                Get => Some((Route::EndpointsList, None)),
                Post => Some((Route::EndpointsCreate, None)),
                _ => None,
            },
        ),
        [Some("api"), Some("endpoints"), Some(id), None, _] => (
            "GET, PATCH, DELETE",
            match method {
                Get => Some((Route::EndpointGet, Some(id))),
                Patch => Some((Route::EndpointPatch, Some(id))),
                Delete => Some((Route::EndpointDelete, Some(id))),
                _ => None,
            },
        ),
        [Some("api"), Some("endpoints"), Some(id), Some("secret"), None] => (
            "GET",
            (method == Get).then_some((Route::EndpointSecret, Some(id))),
        ),
        [Some("api"), Some("endpoints"), Some(id), Some("secret"), Some("rotate")] => (
            "POST",
            (method == Post).then_some((Route::EndpointRotate, Some(id))),
        ),
        [Some("api"), Some("endpoints"), Some(id), Some("failed"), None] => (
            "GET",
            (method == Get).then_some((Route::EndpointFailed, Some(id))),
        ),
        [Some("api"), Some("endpoints"), Some(id), Some(action), None]
            if matches!(action, "pause" | "resume" | "recover") =>
        {
            let route = match action {
                "pause" => Route::EndpointPause,
                "resume" => Route::EndpointResume,
                _ => Route::EndpointRecover,
            };
            ("POST", (method == Post).then_some((route, Some(id))))
        }
        _ => return Err(ApiError::NotFound("no such endpoint")),
    };
    match found {
        Some((route, param)) => Ok(Matched { route, param }),
        None => Err(ApiError::MethodNotAllowed { allow }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(m: Method, p: &str) -> (Route, Option<&str>) {
        let r = route(m, p).unwrap();
        (r.route, r.param)
    }

    #[test]
    fn every_endpoint_and_alias_routes() {
        use Method::*;
        assert_eq!(ok(Get, "/health"), (Route::Health, None));
        assert_eq!(ok(Get, "/health/live"), (Route::Live, None));
        assert_eq!(ok(Get, "/health/ready"), (Route::Ready, None));
        assert_eq!(ok(Get, "/metrics"), (Route::Metrics, None));
        assert_eq!(ok(Get, "/openapi.json"), (Route::OpenApi, None));
        assert_eq!(ok(Post, "/api/keys/generate"), (Route::KeysGenerate, None));
        assert_eq!(ok(Get, "/api/keys"), (Route::KeysInfo, None));
        assert_eq!(ok(Post, "/api/keys/rotate"), (Route::KeysRotate, None));
        assert_eq!(ok(Post, "/api/webhook/config"), (Route::WebhookSet, None));
        assert_eq!(
            ok(Delete, "/api/webhook/config"),
            (Route::WebhookDelete, None)
        );
        assert_eq!(ok(Post, "/api/events"), (Route::EventsCreate, None));
        assert_eq!(ok(Post, "/api/events/"), (Route::EventsCreate, None));
        assert_eq!(ok(Get, "/api/events/abc"), (Route::EventGet, Some("abc")));
        assert_eq!(
            ok(Post, "/api/events/abc/redeliver"),
            (Route::EventRedeliver, Some("abc"))
        );
        assert_eq!(ok(Get, "/api/inbox"), (Route::Inbox, None));
        assert_eq!(ok(Post, "/api/ack/x"), (Route::Ack, Some("x")));
        assert_eq!(ok(Post, "/api/inbox/ack/x"), (Route::Ack, Some("x")));
        assert_eq!(ok(Post, "/api/ack"), (Route::AckBatch, None));
        assert_eq!(ok(Post, "/api/inbox/ack"), (Route::AckBatch, None));
        assert_eq!(ok(Post, "/api/endpoints"), (Route::EndpointsCreate, None));
        assert_eq!(ok(Get, "/api/endpoints/"), (Route::EndpointsList, None));
        assert_eq!(ok(Get, "/api/endpoints/e"), (Route::EndpointGet, Some("e")));
        assert_eq!(
            ok(Patch, "/api/endpoints/e"),
            (Route::EndpointPatch, Some("e"))
        );
        assert_eq!(
            ok(Delete, "/api/endpoints/e"),
            (Route::EndpointDelete, Some("e"))
        );
        assert_eq!(
            ok(Get, "/api/endpoints/e/secret"),
            (Route::EndpointSecret, Some("e"))
        );
        assert_eq!(
            ok(Post, "/api/endpoints/e/secret/rotate"),
            (Route::EndpointRotate, Some("e"))
        );
        assert_eq!(
            ok(Post, "/api/endpoints/e/pause"),
            (Route::EndpointPause, Some("e"))
        );
        assert_eq!(
            ok(Post, "/api/endpoints/e/resume"),
            (Route::EndpointResume, Some("e"))
        );
        assert_eq!(
            ok(Get, "/api/endpoints/e/failed"),
            (Route::EndpointFailed, Some("e"))
        );
        assert_eq!(
            ok(Post, "/api/endpoints/e/recover"),
            (Route::EndpointRecover, Some("e"))
        );
        assert_eq!(
            route(Post, "/api/endpoints/e"),
            Err(ApiError::MethodNotAllowed {
                allow: "GET, PATCH, DELETE"
            })
        );
        assert_eq!(
            route(Post, "/api/endpoints/e/stop"),
            Err(ApiError::NotFound("no such endpoint"))
        );
    }

    #[test]
    fn wrong_method_is_405_with_allow_and_unknown_is_404() {
        use Method::*;
        assert_eq!(
            route(Get, "/api/events"),
            Err(ApiError::MethodNotAllowed { allow: "POST" })
        );
        assert_eq!(
            route(Get, "/api/webhook/config"),
            Err(ApiError::MethodNotAllowed {
                allow: "POST, DELETE"
            })
        );
        assert_eq!(
            route(Other, "/health"),
            Err(ApiError::MethodNotAllowed { allow: "GET" })
        );
        for p in [
            "/",
            "/api",
            "/api/nope",
            "/api/events/a/b",
            "/api/events/a/redeliver/x",
            "/x/y/z/w/v/u",
        ] {
            assert_eq!(
                route(Get, p),
                Err(ApiError::NotFound("no such endpoint")),
                "{p}"
            );
        }
    }

    #[test]
    fn labels_cover_every_route() {
        for (i, r) in Route::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            assert!(!r.labels().1.is_empty());
        }
    }
}
