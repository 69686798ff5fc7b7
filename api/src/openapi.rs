//! `GET /openapi.json`, made from the code: each operation from its
//! handler's `#[utoipa::path]`, each schema from the type the handler
//! answers with (`schema.rs`). The unit test below walks the router's routes
//! and methods and finds each here; the end-to-end suite calls every
//! operation and checks its answers against this document.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi};

use crate::{files, schema, sessions};

/// The `{sessionPath}` of a route (it only describes the parameter).
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct SessionParam {
    /// One segment, `{owner}__{repo}__{branch}`: no `/`, `\`, `.`/`..`,
    /// control characters; at most 255 bytes.
    #[param(rename = "sessionPath", min_length = 1, max_length = 255)]
    session_path: String,
}

/// The `{filePath}` of a route (it only describes the parameter).
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)]
pub struct FileParam {
    /// A relative path inside the session (`workspace/src/index.ts`): no
    /// empty, `.` or `..` segments, no `\`, no control characters; an
    /// encoded `/` (`%2F`) separates names like a raw one.
    #[param(rename = "filePath")]
    file_path: String,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "sessionfs storage worker",
        description = "Sessions as tar.gz objects in S3-compatible storage, with file-level access. \
            Every response carries `X-Container-ID`. When SESSIONFS_API_TOKEN is set, every route \
            but /health and /ready needs `Authorization: Bearer <token>`."
    ),
    paths(
        crate::health,
        crate::ready,
        crate::openapi_doc,
        crate::metrics_text,
        sessions::list,
        sessions::bulk_delete,
        sessions::describe,
        sessions::exists,
        sessions::delete,
        sessions::upload,
        sessions::download,
        files::list,
        files::read,
        files::write,
        files::delete,
    ),
    components(schemas(schema::ErrorBody, schema::ErrorCode)),
    modifiers(&Bearer, &OneIdPerOperation),
    security(("bearer" = []))
)]
struct Doc;

/// The bearer token every route but `/health` and `/ready` may need.
struct Bearer;

impl Modify for Bearer {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// A handler that answers two methods (GET and HEAD of a file, POST and
/// PUT of an upload) gives both the same operation id; ids must be unique,
/// so the second method's gets its name appended (`read_head`).
struct OneIdPerOperation;

impl Modify for OneIdPerOperation {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        for item in doc.paths.paths.values_mut() {
            let mut seen = std::collections::HashSet::new();
            let ops = [
                ("get", &mut item.get),
                ("post", &mut item.post),
                ("head", &mut item.head),
                ("put", &mut item.put),
                ("delete", &mut item.delete),
            ];
            for (method, op) in ops {
                let Some(op) = op.as_mut() else { continue };
                let Some(id) = op.operation_id.clone() else {
                    continue;
                };
                if !seen.insert(id.clone()) {
                    op.operation_id = Some(format!("{id}_{method}"));
                }
            }
        }
    }
}

pub fn document() -> serde_json::Value {
    serde_json::to_value(Doc::openapi()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::Route;

    /// Every route the router answers, with every method it answers, is in
    /// the document, and the document has nothing else.
    #[test]
    fn the_document_has_exactly_the_routes_and_methods_of_the_router() {
        let doc = document();
        let mut routed = std::collections::BTreeSet::new();
        for path in crate::FIXED_ROUTES {
            routed.insert((path.to_owned(), "get".to_owned()));
            routed.insert((path.to_owned(), "head".to_owned()));
        }
        for route in Route::one_of_each() {
            for method in route.allowed().split(", ") {
                routed.insert((route.template().to_owned(), method.to_lowercase()));
            }
        }
        let mut documented = std::collections::BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in ["get", "head", "put", "post", "delete", "patch", "options"] {
                if item.get(method).is_some() {
                    documented.insert((path.clone(), method.to_owned()));
                }
            }
        }
        assert_eq!(routed, documented);
    }

    #[test]
    fn every_error_code_and_answer_schema_is_in_the_document() {
        let doc = document();
        let codes = &doc["components"]["schemas"]["ErrorCode"]["enum"];
        for code in [
            "invalid_session_path",
            "store_unavailable",
            "insufficient_storage",
        ] {
            assert!(
                codes.as_array().unwrap().iter().any(|c| c == code),
                "{codes}"
            );
        }
        for schema in [
            "Session",
            "SessionList",
            "Uploaded",
            "FileList",
            "Health",
            "Ready",
        ] {
            assert!(doc["components"]["schemas"][schema].is_object(), "{schema}");
        }
    }
}
