"""vLLM integration: the KV connector vLLM loads to use a cache node.

``lmcache_node.vllm.connector.LMCacheNodeConnector`` is the class vLLM instantiates
(``--kv-transfer-config '{"kv_connector":"LMCacheNodeConnector",
"kv_connector_module_path":"lmcache_node.vllm.connector", ...}'``). Only that module imports
vLLM; the planning, settings and transfer modules here are plain Python so they can be tested
(and type-checked) without vLLM installed.
"""
