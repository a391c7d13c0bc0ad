// A Shoal HTTP function in C: clang's wasm32-wasi target, bindings from
// wit-bindgen (`make` generates them from abi/wit), made a component with
// the WASI preview1 reactor adapter.
//
//   GET  /hello-c?name=x     -> "hello, x"
//   POST /hello-c/count      -> increments "hits" in bucket "default"
//   GET  /hello-c/greeting   -> the `greeting` config value
//   POST /hello-c/publish    -> publishes the body on topic "orders"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http_function.h"

// The most of a request body this function reads.
#define MAX_BODY (256 * 1024)
// blocking-write-and-flush takes at most 4096 bytes a call.
#define WRITE_CHUNK 4096

typedef wasi_http_types_own_response_outparam_t outparam_t;

static void respond(outparam_t out, uint16_t status, const char *text) {
  wasi_http_types_own_fields_t headers = wasi_http_types_constructor_fields();
  wasi_http_types_field_name_t name;
  http_function_string_set(&name, "content-type");
  const char *type = "text/plain; charset=utf-8";
  wasi_http_types_field_value_t value = {(uint8_t *)type, strlen(type)};
  wasi_http_types_header_error_t header_error;
  wasi_http_types_method_fields_append(wasi_http_types_borrow_fields(headers), &name, &value, &header_error);

  wasi_http_types_own_outgoing_response_t response = wasi_http_types_constructor_outgoing_response(headers);
  wasi_http_types_borrow_outgoing_response_t borrowed = wasi_http_types_borrow_outgoing_response(response);
  wasi_http_types_method_outgoing_response_set_status_code(borrowed, status);
  wasi_http_types_own_outgoing_body_t body;
  wasi_http_types_method_outgoing_response_body(borrowed, &body);

  wasi_http_types_result_own_outgoing_response_error_code_t result = {.is_err = false, .val = {.ok = response}};
  wasi_http_types_static_response_outparam_set(out, &result);

  wasi_http_types_own_output_stream_t stream;
  if (wasi_http_types_method_outgoing_body_write(wasi_http_types_borrow_outgoing_body(body), &stream)) {
    size_t length = strlen(text);
    for (size_t at = 0; at < length; at += WRITE_CHUNK) {
      size_t n = length - at < WRITE_CHUNK ? length - at : WRITE_CHUNK;
      http_function_list_u8_t chunk = {(uint8_t *)text + at, n};
      wasi_io_streams_stream_error_t error;
      if (!wasi_io_streams_method_output_stream_blocking_write_and_flush(
              wasi_io_streams_borrow_output_stream(stream), &chunk, &error)) {
        break;
      }
    }
    wasi_io_streams_output_stream_drop_own(stream);
  }
  wasi_http_types_error_code_t finish_error;
  wasi_http_types_static_outgoing_body_finish(body, NULL, &finish_error);
}

// Read up to MAX_BODY bytes of the request body into `data`; its length.
static size_t read_body(wasi_http_types_borrow_incoming_request_t request, uint8_t *data) {
  size_t length = 0;
  wasi_http_types_own_incoming_body_t body;
  if (!wasi_http_types_method_incoming_request_consume(request, &body)) return 0;
  wasi_http_types_own_input_stream_t stream;
  if (wasi_http_types_method_incoming_body_stream(wasi_http_types_borrow_incoming_body(body), &stream)) {
    while (length < MAX_BODY) {
      http_function_list_u8_t chunk;
      wasi_io_streams_stream_error_t error;
      if (!wasi_io_streams_method_input_stream_blocking_read(
              wasi_io_streams_borrow_input_stream(stream), MAX_BODY - length, &chunk, &error)) {
        break;  // closed (the end) or failed
      }
      memcpy(data + length, chunk.ptr, chunk.len);
      length += chunk.len;
      http_function_list_u8_free(&chunk);
    }
    wasi_io_streams_input_stream_drop_own(stream);
  }
  wasi_http_types_incoming_body_drop_own(body);
  return length;
}

// The value of query parameter `key` in `query` (not decoded), or NULL.
static char *query_param(char *query, const char *key) {
  size_t key_length = strlen(key);
  for (char *pair = strtok(query, "&"); pair; pair = strtok(NULL, "&")) {
    if (strncmp(pair, key, key_length) == 0 && pair[key_length] == '=') return pair + key_length + 1;
  }
  return NULL;
}

static const char *kv_error(const wasi_keyvalue_store_error_t *error) {
  switch (error->tag) {
    case WASI_KEYVALUE_STORE_ERROR_NO_SUCH_STORE: return "no-such-store";
    case WASI_KEYVALUE_STORE_ERROR_ACCESS_DENIED: return "access-denied";
    default: return "other";
  }
}

void exports_wasi_http_incoming_handler_handle(wasi_http_types_own_incoming_request_t request, outparam_t out) {
  static char text[512];
  wasi_http_types_borrow_incoming_request_t borrowed = wasi_http_types_borrow_incoming_request(request);

  http_function_string_t target = {0};
  wasi_http_types_method_incoming_request_path_with_query(borrowed, &target);
  char *path = strndup((const char *)target.ptr, target.len);
  http_function_string_free(&target);
  char *query = strchr(path, '?');
  if (query) *query++ = '\0';
  const char *action = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
  wasi_http_types_method_t method;
  wasi_http_types_method_incoming_request_method(borrowed, &method);
  int post = method.tag == WASI_HTTP_TYPES_METHOD_POST;
  wasi_http_types_method_free(&method);

  uint16_t status = 200;
  if (post && strcmp(action, "count") == 0) {
    http_function_string_t bucket_name, key;
    http_function_string_set(&bucket_name, "default");
    http_function_string_set(&key, "hits");
    wasi_keyvalue_store_own_bucket_t bucket;
    wasi_keyvalue_store_error_t error;
    uint64_t hits;
    if (!wasi_keyvalue_store_open(&bucket_name, &bucket, &error)) {
      status = 403;
      snprintf(text, sizeof text, "refused: %s\n", kv_error(&error));
    } else if (!wasi_keyvalue_atomics_increment(wasi_keyvalue_store_borrow_bucket(bucket), &key, 1, &hits, &error)) {
      status = 403;
      snprintf(text, sizeof text, "refused: %s\n", kv_error(&error));
      wasi_keyvalue_store_bucket_drop_own(bucket);
    } else {
      snprintf(text, sizeof text, "%llu\n", (unsigned long long)hits);
      wasi_keyvalue_store_bucket_drop_own(bucket);
    }
  } else if (strcmp(action, "greeting") == 0) {
    http_function_string_t key;
    http_function_string_set(&key, "greeting");
    http_function_option_string_t value;
    wasi_config_store_error_t error;
    if (!wasi_config_store_get(&key, &value, &error)) {
      status = 403;
      http_function_string_t *why = &error.val.upstream;  // both cases carry text
      snprintf(text, sizeof text, "refused: %.*s\n", (int)why->len, (const char *)why->ptr);
    } else if (!value.is_some) {
      status = 404;
      snprintf(text, sizeof text, "no greeting configured\n");
    } else {
      snprintf(text, sizeof text, "%.*s\n", (int)value.val.len, (const char *)value.val.ptr);
      http_function_string_free(&value.val);
    }
  } else if (post && strcmp(action, "publish") == 0) {
    uint8_t *data = malloc(MAX_BODY);
    http_function_list_u8_t message = {data, data ? read_body(borrowed, data) : 0};
    http_function_string_t topic;
    http_function_string_set(&topic, "orders");
    shoal_runtime_pubsub_error_t error;
    if (shoal_runtime_pubsub_publish(&topic, &message, &error)) {
      status = 202;
      snprintf(text, sizeof text, "published\n");
    } else {
      static const char *kinds[] = {"denied", "limited", "not-found", "backend"};
      http_function_string_t *why = &error.val.denied;  // every case carries text
      status = 403;
      snprintf(text, sizeof text, "refused: %s: %.*s\n", kinds[error.tag & 3], (int)why->len, (const char *)why->ptr);
    }
    free(data);
  } else {
    const char *name = query ? query_param(query, "name") : NULL;
    snprintf(text, sizeof text, "hello, %s\n", name ? name : "world");
  }
  free(path);
  wasi_http_types_incoming_request_drop_own(request);
  respond(out, status, text);
}
