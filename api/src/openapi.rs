//! `GET /openapi.json`: the OpenAPI 3.0 description of every route, written
//! out by hand beside the routes it describes (the route table in `lib.rs`
//! and the paths in [`crate::paths`]); the end-to-end suite checks that
//! every path here answers as described.

use serde_json::{json, Value};

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    })
}

fn json_response(description: &str, schema: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}
    })
}

fn session_param() -> Value {
    json!({
        "name": "sessionPath", "in": "path", "required": true,
        "description": "One segment, `{owner}__{repo}__{branch}`: no `/`, `\\\\`, `.`/`..`, control characters; at most 255 bytes.",
        "schema": {"type": "string", "minLength": 1, "maxLength": 255}
    })
}

fn file_param() -> Value {
    json!({
        "name": "filePath", "in": "path", "required": true,
        "description": "A relative path inside the session (`workspace/src/index.ts`): no empty, `.` or `..` segments, no `\\\\`, no control characters.",
        "schema": {"type": "string"}
    })
}

pub fn document() -> Value {
    // The errors a route can give, by what it does: every route but the
    // health check needs the token when one is set and may meet a store
    // failure; routes with a path in them check it; writes may meet a
    // read-only server; writes of bytes may meet a full overlay disk.
    let merged = |mut ok: Value, errors: Value| {
        if let (Some(o), Some(e)) = (ok.as_object_mut(), errors.as_object()) {
            for (k, v) in e {
                o.entry(k.clone()).or_insert(v.clone());
            }
        }
        ok
    };
    let base = json!({
        "401": error_response("unauthorized: a bearer token is configured and was not given"),
        "500": error_response("the store or the overlay failed"),
        "503": error_response("store_unavailable: the object store is down or stalling (Retry-After says when to try again)"),
    });
    let with = |ok: Value| merged(ok, base.clone());
    let with_path = |ok: Value| {
        merged(
            with(ok),
            json!({
                "400": error_response("invalid_session_path, invalid_file_path or invalid_request"),
                "409": error_response("conflict: another process on this host holds the session, or a directory is in the way"),
            }),
        )
    };
    let with_write = |ok: Value| {
        merged(
            with_path(ok),
            json!({"403": error_response("read_only: this server does not accept changes")}),
        )
    };
    let with_bytes = |ok: Value| {
        merged(
            with_write(ok),
            json!({"507": error_response("insufficient_storage: the overlay disk is full")}),
        )
    };
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "sessionfs storage worker",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Sessions as tar.gz objects in S3-compatible storage, with file-level access. Every response carries `X-Container-ID`. When SESSIONFS_API_TOKEN is set, every route but /health and /ready needs `Authorization: Bearer <token>`."
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object", "required": ["error", "message", "containerId"],
                    "properties": {
                        "error": {"type": "string", "enum": [
                            "invalid_session_path", "invalid_file_path", "invalid_request", "invalid_tarball",
                            "session_not_found", "file_not_found", "not_found", "method_not_allowed",
                            "payload_too_large", "range_not_satisfiable", "conflict", "read_only",
                            "unauthorized", "upload_failed", "download_failed", "insufficient_storage", "store_unavailable",
                            "internal_error"]},
                        "message": {"type": "string"},
                        "containerId": {"type": "string"}
                    }
                },
                "Health": {
                    "type": "object", "required": ["status", "service", "version", "build", "containerId", "timestamp"],
                    "properties": {
                        "status": {"type": "string", "enum": ["ok"]},
                        "service": {"type": "string"},
                        "implementation": {"type": "string"},
                        "version": {"type": "string"},
                        "build": {"type": "object", "properties": {
                            "commitSha": {"type": "string"}, "timestamp": {"type": "string"}, "version": {"type": "string"}}},
                        "containerId": {"type": "string"},
                        "timestamp": {"type": "string", "format": "date-time"}
                    }
                },
                "Ready": {
                    "type": "object", "required": ["status", "store", "containerId"],
                    "properties": {
                        "status": {"type": "string", "enum": ["ready"]},
                        "store": {"type": "string"},
                        "containerId": {"type": "string"}
                    }
                },
                "Session": {
                    "type": "object", "required": ["sessionPath", "size", "pendingChanges"],
                    "properties": {
                        "sessionPath": {"type": "string"},
                        "createdAt": {"type": "string", "format": "date-time", "nullable": true},
                        "lastModified": {"type": "string", "format": "date-time", "nullable": true},
                        "size": {"type": "integer", "minimum": 0},
                        "etag": {"type": "string", "nullable": true},
                        "pendingChanges": {"type": "boolean"},
                        "containerId": {"type": "string"}
                    }
                },
                "SessionList": {
                    "type": "object", "required": ["count", "sessions", "containerId"],
                    "properties": {
                        "count": {"type": "integer"},
                        "sessions": {"type": "array", "items": {"$ref": "#/components/schemas/Session"}},
                        "containerId": {"type": "string"}
                    }
                },
                "Deleted": {
                    "type": "object", "required": ["sessionPath", "deleted", "containerId"],
                    "properties": {"sessionPath": {"type": "string"}, "deleted": {"type": "boolean"}, "containerId": {"type": "string"}}
                },
                "BulkDeleteRequest": {
                    "type": "object", "required": ["sessionPaths"],
                    "properties": {"sessionPaths": {"type": "array", "maxItems": 1000, "items": {"type": "string"}}}
                },
                "BulkDeleted": {
                    "type": "object", "required": ["deletedCount", "sessionPaths", "results", "containerId"],
                    "properties": {
                        "deletedCount": {"type": "integer"},
                        "sessionPaths": {"type": "array", "items": {"type": "string"}},
                        "results": {"type": "array", "items": {"type": "object", "required": ["sessionPath", "deleted"],
                            "properties": {"sessionPath": {"type": "string"}, "deleted": {"type": "boolean"},
                                "error": {"type": "string"}, "message": {"type": "string"}}}},
                        "containerId": {"type": "string"}
                    }
                },
                "Uploaded": {
                    "type": "object", "required": ["sessionPath", "uploaded", "size", "containerId"],
                    "properties": {
                        "sessionPath": {"type": "string"}, "uploaded": {"type": "boolean"},
                        "size": {"type": "integer"}, "etag": {"type": "string"}, "entries": {"type": "integer"},
                        "format": {"type": "string", "enum": ["sessionfs", "foreign"]},
                        "containerId": {"type": "string"}
                    }
                },
                "FileList": {
                    "type": "object", "required": ["sessionPath", "count", "files", "containerId"],
                    "properties": {
                        "sessionPath": {"type": "string"}, "count": {"type": "integer"},
                        "files": {"type": "array", "items": {"type": "object", "required": ["path", "size"],
                            "properties": {"path": {"type": "string"}, "size": {"type": "integer"}}}},
                        "containerId": {"type": "string"}
                    }
                },
                "FileWritten": {
                    "type": "object", "required": ["success", "sessionPath", "filePath", "size", "containerId"],
                    "properties": {"success": {"type": "boolean"}, "sessionPath": {"type": "string"},
                        "filePath": {"type": "string"}, "size": {"type": "integer"}, "containerId": {"type": "string"}}
                },
                "FileDeleted": {
                    "type": "object", "required": ["success", "sessionPath", "filePath", "containerId"],
                    "properties": {"success": {"type": "boolean"}, "sessionPath": {"type": "string"},
                        "filePath": {"type": "string"}, "containerId": {"type": "string"}}
                }
            }
        },
        "security": [{"bearer": []}],
        "paths": {
            "/health": {"get": {"summary": "Health and build information", "security": [],
                "responses": {"200": json_response("healthy", "Health")}}},
            "/ready": {"get": {"summary": "Whether the object store answers (for load balancers and orchestrators)", "security": [],
                "responses": {"200": json_response("the store answers", "Ready"),
                    "503": error_response("store_unavailable: the store did not answer a listing within 5 s")}}},
            "/openapi.json": {"get": {"summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3.0", "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics",
                "responses": {"200": {"description": "text format 0.0.4", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/api/storage-worker/sessions": {"get": {"summary": "List all sessions",
                "responses": with(json!({"200": json_response("the sessions", "SessionList")}))}},
            "/api/storage-worker/sessions/bulk-delete": {"post": {"summary": "Delete several sessions",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/BulkDeleteRequest"}}}},
                "responses": with_write(json!({"200": json_response("one result per path", "BulkDeleted"),
                    "413": error_response("payload_too_large")}))}},
            "/api/storage-worker/sessions/{sessionPath}": {
                "parameters": [session_param()],
                "get": {"summary": "Session metadata", "responses": with_path(json!({
                    "200": json_response("the session", "Session"), "404": error_response("session_not_found")}))},
                "head": {"summary": "Whether the session exists", "responses": {
                    "200": {"description": "it exists"}, "404": {"description": "it does not"}, "400": {"description": "invalid session path"},
                    "503": {"description": "the store is unavailable"}}},
                "delete": {"summary": "Delete the session (object and local changes)", "responses": with_write(json!({
                    "200": json_response("deleted", "Deleted"), "404": error_response("session_not_found"),
                    "409": error_response("conflict: the session is mounted here")}))}
            },
            "/api/storage-worker/sessions/{sessionPath}/upload": {
                "parameters": [session_param()],
                "post": {"summary": "Replace the session with a tar.gz (raw body or multipart field `tarball`)",
                    "requestBody": {"required": true, "content": {
                        "application/gzip": {"schema": {"type": "string", "format": "binary"}},
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                        "multipart/form-data": {"schema": {"type": "object", "properties": {"tarball": {"type": "string", "format": "binary"}}}}}},
                    "responses": with_bytes(json!({"200": json_response("stored", "Uploaded"),
                        "409": error_response("conflict: the session is mounted here"),
                        "413": error_response("payload_too_large: the body or its inflated size is over the limit")}))}
            },
            "/api/storage-worker/sessions/{sessionPath}/download": {
                "parameters": [session_param()],
                "get": {"summary": "The session as tar.gz, with changes not yet written back",
                    "responses": with_path(json!({
                        "200": {"description": "the tarball", "headers": {
                            "ETag": {"schema": {"type": "string"}}, "Content-Length": {"schema": {"type": "integer"}},
                            "Content-Disposition": {"schema": {"type": "string"}}},
                            "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}}},
                        "404": error_response("session_not_found")}))}
            },
            "/api/storage-worker/sessions/{sessionPath}/files": {
                "parameters": [session_param()],
                "get": {"summary": "List the session's regular files", "responses": with_path(json!({
                    "200": json_response("the files", "FileList"), "404": error_response("session_not_found")}))}
            },
            "/api/storage-worker/sessions/{sessionPath}/files/{filePath}": {
                "parameters": [session_param(), file_param()],
                "get": {"summary": "Read a file (a single Range is honoured)",
                    "parameters": [{"name": "Range", "in": "header", "required": false, "schema": {"type": "string"}}],
                    "responses": with_path(json!({
                        "200": {"description": "the bytes, Content-Type from the name", "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                        "206": {"description": "the range asked for"},
                        "304": {"description": "If-None-Match matched"},
                        "404": error_response("session_not_found or file_not_found"),
                        "416": error_response("range_not_satisfiable")}))},
                "head": {"summary": "Whether the file exists, with its headers", "responses": {
                    "200": {"description": "it exists"}, "404": {"description": "it does not"}, "400": {"description": "invalid path"},
                    "503": {"description": "the store is unavailable"}}},
                "put": {"summary": "Create or replace a file (creates the session and directories)",
                    "requestBody": {"required": true, "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}},
                    "responses": with_bytes(json!({
                        "200": json_response("written", "FileWritten"),
                        "409": error_response("conflict: a directory is in the way"),
                        "413": error_response("payload_too_large")}))},
                "delete": {"summary": "Delete a file", "responses": with_write(json!({
                    "200": json_response("deleted", "FileDeleted"),
                    "404": error_response("session_not_found or file_not_found")}))}
            }
        }
    })
}
