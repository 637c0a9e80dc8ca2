# Sourced by the training benchmarks: bench_model_config SIZE prints the config.json of the
# 10m / 50m / 200m Llama shapes they share (vocabulary 8192, no tokenizer).
bench_model_config() {
  case "$1" in
    10m)  echo '{"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 4096, "vocab_size": 8192}' ;;
    50m)  echo '{"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 14, "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 4096, "vocab_size": 8192}' ;;
    100m) echo '{"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 14, "num_attention_heads": 12, "num_key_value_heads": 4, "max_position_embeddings": 4096, "vocab_size": 8192}' ;;
    200m) echo '{"hidden_size": 1024, "intermediate_size": 2752, "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 8, "max_position_embeddings": 4096, "vocab_size": 8192}' ;;
    *) echo "unknown size $1 (10m, 50m, 100m or 200m)" >&2; return 2 ;;
  esac
}
