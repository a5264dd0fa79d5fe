package transport

// WithProtocols returns cfg for a transport that announces and accepts p
// instead of Spoken, to play a build of another release; the empty range
// plays a build from before versions.
func WithProtocols(cfg Config, p Protocols) Config {
	cfg.protocols = &p
	return cfg
}
