/* c_api_test.c: every entry point of cqil.h, bad input included, as plain C (run under ASan in CI).
 *
 *   cqil-c-api-test ENGINE_DIR [BAD_ENGINE_DIR ...]
 *
 * ENGINE_DIR: a good engine. Each BAD_ENGINE_DIR must fail to open with CQIL_ERROR_ENGINE; its
 * one-line message is printed as "bad: <dir>: <message>" for the caller to check. Prints "ok" and
 * exits 0 when every check holds; "FAIL ..." lines otherwise.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cqil.h"

static int failures = 0;

#define CHECK(cond, what)                                                                  \
  do {                                                                                     \
    if (!(cond)) {                                                                         \
      fprintf(stderr, "FAIL %s (line %d): last error: %s\n", what, __LINE__, cqil_last_error()); \
      ++failures;                                                                          \
    }                                                                                      \
  } while (0)

/* A failing call: the expected status and a one-line, non-empty message. */
static void expect(cqil_status got, cqil_status want, const char* what) {
  const char* msg = cqil_last_error();
  CHECK(got == want, what);
  CHECK(msg[0] != '\0' && strchr(msg, '\n') == NULL, what);
}

static void null_handles(void) {
  int64_t v = 0, ids[2] = {1, 2}, tok[2];
  size_t len = 2, n = 0;
  int flag = 0;
  float logits[4];
  expect(cqil_engine_create(NULL, NULL, NULL), CQIL_ERROR_INVALID_ARGUMENT, "create with NULL out");
  expect(cqil_engine_vocab_size(NULL, &v), CQIL_ERROR_INVALID_ARGUMENT, "vocab_size(NULL)");
  expect(cqil_engine_eos_ids(NULL, NULL, 0, &n), CQIL_ERROR_INVALID_ARGUMENT, "eos_ids(NULL)");
  expect(cqil_engine_options_set_threads(NULL, 1), CQIL_ERROR_INVALID_ARGUMENT, "set_threads(NULL)");
  expect(cqil_params_set_seed(NULL, 1), CQIL_ERROR_INVALID_ARGUMENT, "set_seed(NULL)");
  expect(cqil_generator_create(NULL, NULL, ids, &len, 1, NULL), CQIL_ERROR_INVALID_ARGUMENT, "generator on NULL");
  expect(cqil_generator_next_tokens(NULL, tok, 2), CQIL_ERROR_INVALID_ARGUMENT, "next_tokens(NULL)");
  expect(cqil_generator_append_tokens(NULL, ids, &len, 1), CQIL_ERROR_INVALID_ARGUMENT, "append(NULL)");
  expect(cqil_generator_rewind(NULL, 1), CQIL_ERROR_INVALID_ARGUMENT, "rewind(NULL)");
  expect(cqil_generator_done(NULL, &flag), CQIL_ERROR_INVALID_ARGUMENT, "done(NULL)");
  expect(cqil_generator_logits(NULL, logits, 4), CQIL_ERROR_INVALID_ARGUMENT, "logits(NULL)");
  expect(cqil_generator_tokens(NULL, 0, tok, 2, &n), CQIL_ERROR_INVALID_ARGUMENT, "tokens(NULL)");
  cqil_engine_destroy(NULL); /* no-ops */
  cqil_generator_destroy(NULL);
  cqil_params_destroy(NULL);
  cqil_engine_options_destroy(NULL);
}

static void bad_engines(int count, char** dirs) {
  cqil_engine* e = NULL;
  expect(cqil_engine_create("/nonexistent/engine", NULL, &e), CQIL_ERROR_ENGINE, "missing engine dir");
  CHECK(e == NULL && strstr(cqil_last_error(), "is not a directory") != NULL, "missing dir message");
  for (int i = 0; i < count; ++i) {
    e = NULL;
    expect(cqil_engine_create(dirs[i], NULL, &e), CQIL_ERROR_ENGINE, dirs[i]);
    CHECK(e == NULL, "no engine on failure");
    printf("bad: %s: %s\n", dirs[i], cqil_last_error());
    cqil_engine_destroy(e);
  }
}

static void bad_input(cqil_engine* e, int64_t vocab, int64_t max_seq_len) {
  cqil_generator* g = NULL;
  cqil_params* p = NULL;
  int64_t ids[3] = {1, vocab, 3}, neg[1] = {-1};
  size_t len = 3, one = 1, zero = 0;
  expect(cqil_generator_create(e, NULL, ids, &len, 1, &g), CQIL_ERROR_INVALID_ARGUMENT, "id == vocab");
  CHECK(strstr(cqil_last_error(), "outside the vocabulary") != NULL, "vocabulary message");
  expect(cqil_generator_create(e, NULL, neg, &one, 1, &g), CQIL_ERROR_INVALID_ARGUMENT, "negative id");
  expect(cqil_generator_create(e, NULL, ids, &zero, 1, &g), CQIL_ERROR_INVALID_ARGUMENT, "empty row");
  expect(cqil_generator_create(e, NULL, ids, &len, 0, &g), CQIL_ERROR_INVALID_ARGUMENT, "batch 0");
  expect(cqil_generator_create(e, NULL, NULL, &len, 1, &g), CQIL_ERROR_INVALID_ARGUMENT, "NULL ids");
  size_t long_len = (size_t)max_seq_len + 1;
  int64_t* long_ids = calloc(long_len, sizeof(int64_t));
  expect(cqil_generator_create(e, NULL, long_ids, &long_len, 1, &g), CQIL_ERROR_INVALID_ARGUMENT, "prompt > max_seq_len");
  CHECK(strstr(cqil_last_error(), "max_seq_len") != NULL, "max_seq_len message");
  free(long_ids);
  CHECK(g == NULL, "no generator on failure");
  CHECK(cqil_params_create(&p) == CQIL_OK, "params");
  expect(cqil_params_set_sampling(p, -1.0, 0, 1.0), CQIL_ERROR_INVALID_ARGUMENT, "negative temperature");
  expect(cqil_params_set_sampling(p, 1.0, 0, 0.0), CQIL_ERROR_INVALID_ARGUMENT, "top_p 0");
  expect(cqil_params_set_max_new_tokens(p, -2), CQIL_ERROR_INVALID_ARGUMENT, "max_new_tokens -2");
  CHECK(cqil_params_set_max_new_tokens(p, max_seq_len) == CQIL_OK, "max_new_tokens");
  ids[1] = 2;
  expect(cqil_generator_create(e, p, ids, &len, 1, &g), CQIL_ERROR_INVALID_ARGUMENT, "prompt + new > max_seq_len");
  cqil_params_destroy(p);
}

static void generate(cqil_engine* e, int64_t vocab) {
  cqil_params* p = NULL;
  cqil_generator* g = NULL;
  int64_t ids[5] = {5, 6, 7, 8, 9}, tok[2], more[2] = {11, 12};
  size_t lens[2] = {3, 2}, more_lens[2] = {1, 1}, n = 0, batch = 0;
  int done = 0, reason = -1;
  CHECK(cqil_params_create(&p) == CQIL_OK && cqil_params_set_max_new_tokens(p, 4) == CQIL_OK, "params");
  CHECK(cqil_generator_create(e, p, ids, lens, 2, &g) == CQIL_OK, "prefill of a ragged batch");
  if (!g) return;
  float* logits = malloc(sizeof(float) * 2 * (size_t)vocab);
  CHECK(cqil_generator_batch(g, &batch) == CQIL_OK && batch == 2, "batch");
  CHECK(cqil_generator_logits(g, logits, 2 * (size_t)vocab) == CQIL_OK, "logits");
  expect(cqil_generator_logits(g, logits, 3), CQIL_ERROR_INVALID_ARGUMENT, "logits buffer too small");
  expect(cqil_generator_next_tokens(g, tok, 1), CQIL_ERROR_INVALID_ARGUMENT, "tokens buffer too small");
  while (cqil_generator_done(g, &done) == CQIL_OK && !done) CHECK(cqil_generator_next_tokens(g, tok, 2) == CQIL_OK, "decode");
  expect(cqil_generator_next_tokens(g, tok, 2), CQIL_ERROR_STATE, "next_tokens when done");
  CHECK(cqil_generator_tokens(g, 0, NULL, 0, &n) == CQIL_OK && n == 3 + 4, "row 0: prompt + 4 tokens");
  CHECK(cqil_generator_finish_reason(g, 1, &reason) == CQIL_OK && reason == 2, "finished by length");
  expect(cqil_generator_tokens(g, 2, NULL, 0, &n), CQIL_ERROR_INVALID_ARGUMENT, "row outside the batch");
  CHECK(cqil_generator_rewind(g, 2) == CQIL_OK, "rewind");
  expect(cqil_generator_logits(g, logits, 2 * (size_t)vocab), CQIL_ERROR_STATE, "no logits after a rewind");
  expect(cqil_generator_rewind(g, 1000), CQIL_ERROR_INVALID_ARGUMENT, "rewind too far");
  more[0] = vocab;
  expect(cqil_generator_append_tokens(g, more, more_lens, 2), CQIL_ERROR_INVALID_ARGUMENT, "append outside the vocabulary");
  more[0] = 11;
  expect(cqil_generator_append_tokens(g, more, more_lens, 1), CQIL_ERROR_INVALID_ARGUMENT, "append to fewer rows");
  CHECK(cqil_generator_append_tokens(g, more, more_lens, 2) == CQIL_OK, "append");
  CHECK(cqil_generator_next_tokens(g, tok, 2) == CQIL_OK, "decode after append");
  CHECK(tok[0] >= 0 && tok[0] < vocab && tok[1] >= 0 && tok[1] < vocab, "tokens in the vocabulary");
  cqil_generator_destroy(g);
  cqil_params_destroy(p);
  free(logits);
}

int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s ENGINE_DIR [BAD_ENGINE_DIR ...]\n", argv[0]);
    return 2;
  }
  null_handles();
  bad_engines(argc - 2, argv + 2);
  cqil_engine_options* o = NULL;
  cqil_engine* e = NULL;
  CHECK(cqil_engine_options_create(&o) == CQIL_OK && cqil_engine_options_set_threads(o, 1) == CQIL_OK, "options");
  expect(cqil_engine_options_set_threads(o, -1), CQIL_ERROR_INVALID_ARGUMENT, "threads -1");
  CHECK(cqil_engine_options_set_devices(o, "tpu") == CQIL_OK, "devices are checked at open");
  expect(cqil_engine_create(argv[1], o, &e), CQIL_ERROR_INVALID_ARGUMENT, "unknown device");
  CHECK(cqil_engine_options_set_devices(o, NULL) == CQIL_OK, "default devices");
  CHECK(cqil_engine_create(argv[1], o, &e) == CQIL_OK, "open");
  cqil_engine_options_destroy(o);
  if (!e) return 1;
  int64_t vocab = 0, max_seq_len = 0;
  CHECK(cqil_engine_vocab_size(e, &vocab) == CQIL_OK && cqil_engine_max_seq_len(e, &max_seq_len) == CQIL_OK, "sizes");
  bad_input(e, vocab, max_seq_len);
  generate(e, vocab);
  cqil_engine_destroy(e);
  printf("%s: %d failure(s)\n", failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}
