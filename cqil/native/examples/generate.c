/* generate.c: a plain C client of libcqil: greedy generation for one or more prompts.
 *
 *   cqil-generate ENGINE_DIR NEW_TOKENS IDS [IDS ...]       e.g.  cqil-generate engine 8 1,2,3 4,5
 *
 * Each IDS is one prompt (comma-separated token ids); ragged prompts form one left-padded batch.
 * Prints each row's tokens (prompt + new). Every handle is destroyed on every path.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cqil.h"

static int fail(const char* what) {
  fprintf(stderr, "cqil-generate: error: %s: %s\n", what, cqil_last_error());
  return 1;
}

int main(int argc, char** argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: %s ENGINE_DIR NEW_TOKENS IDS [IDS ...]\n", argv[0]);
    return 2;
  }
  size_t batch = (size_t)(argc - 3), total = 0, capacity = 0;
  for (int i = 3; i < argc; ++i) capacity += strlen(argv[i]) + 1; /* more than the ids it holds */
  int64_t* ids = malloc(sizeof(int64_t) * capacity);
  size_t* lengths = calloc(batch, sizeof(size_t));
  if (!ids || !lengths) return 1;
  for (size_t b = 0; b < batch; ++b) {
    for (char* s = argv[3 + b]; *s;) {
      char* end;
      ids[total++] = strtoll(s, &end, 10);
      ++lengths[b];
      s = *end == ',' ? end + 1 : end + strlen(end);
    }
  }

  int rc = 0;
  cqil_engine* engine = NULL;
  cqil_params* params = NULL;
  cqil_generator* gen = NULL;
  int64_t* tokens = malloc(sizeof(int64_t) * batch);
  if (cqil_engine_create(argv[1], NULL, &engine) != CQIL_OK) {
    rc = fail("open");
  } else if (cqil_params_create(&params) != CQIL_OK ||
             cqil_params_set_max_new_tokens(params, atoll(argv[2])) != CQIL_OK) {
    rc = fail("params");
  } else if (cqil_generator_create(engine, params, ids, lengths, batch, &gen) != CQIL_OK) {
    rc = fail("prefill");
  } else {
    int done = 0;
    while (rc == 0 && cqil_generator_done(gen, &done) == CQIL_OK && !done)
      if (cqil_generator_next_tokens(gen, tokens, batch) != CQIL_OK) rc = fail("decode");
    for (size_t b = 0; b < batch && rc == 0; ++b) {
      size_t n = 0;
      cqil_generator_tokens(gen, b, NULL, 0, &n);
      int64_t* row = malloc(sizeof(int64_t) * n);
      cqil_generator_tokens(gen, b, row, n, &n);
      printf("row %zu:", b);
      for (size_t i = 0; i < n; ++i) printf(" %lld", (long long)row[i]);
      printf("\n");
      free(row);
    }
  }
  cqil_generator_destroy(gen);
  cqil_params_destroy(params);
  cqil_engine_destroy(engine);
  free(tokens);
  free(ids);
  free(lengths);
  return rc;
}
