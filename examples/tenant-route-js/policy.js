// tenant-route: a Tollgate onHandshake policy in JavaScript (componentize-js).
//
// Derives the backend's routing header from a claim and the query string: a client opens
// wss://gateway/chat?region=eu with a token whose `tenant` claim is `acme`; jwt-validate (run
// before this policy) has put `jwt.tenant` into the context; this policy sends the backend
// `X-Tenant-Route: acme.eu`, drops `region` from the backend's query, and refuses regions that
// are not configured.
//
// Config (the attachment's `config` table):
//   regions = ["eu", "us"]        # allowed values of the query parameter
//   default_region = "eu"         # when the client sends none (optional: else 400)
//   tenant_context = "jwt.tenant" # context value holding the tenant (default shown)
//   header = "X-Tenant-Route"     # header set for the backend (default shown)

import { prepared } from 'tollgate:policy/config@0.2.0';
import { log } from 'tollgate:policy/log@0.2.0';

const KEYS = ['regions', 'default_region', 'tenant_context', 'header'];

// The prepared config, parsed on the first handshake an instance serves: `config.prepared` is
// the same string for the instance's whole life, and a pooled instance serves many handshakes.
let cached;
function config() {
  return (cached ??= JSON.parse(prepared()));
}

function reject(status, message) {
  return {
    tag: 'reject',
    val: {
      status,
      headers: [{ name: 'content-type', value: 'text/plain' }],
      body: new TextEncoder().encode(message + '\n'),
    },
  };
}

export const handshake = {
  declare() {
    return {
      name: 'tenant-route',
      version: '0.1.0',
      capabilities: ['read-request', 'modify-headers', 'modify-query', 'use-context', 'reject'],
    };
  },

  configure(configJson) {
    let raw;
    try {
      raw = JSON.parse(configJson);
    } catch (e) {
      throw `config is not JSON: ${e}`;
    }
    for (const k of Object.keys(raw)) {
      if (!KEYS.includes(k)) throw `unknown key: ${k}`;
    }
    const regions = raw.regions;
    if (!Array.isArray(regions) || regions.length === 0 || !regions.every((r) => typeof r === 'string' && /^[a-z0-9-]+$/.test(r))) {
      throw 'regions: must be a non-empty list of lower-case names, e.g. ["eu", "us"]';
    }
    if (raw.default_region !== undefined && !regions.includes(raw.default_region)) {
      throw `default_region: \`${raw.default_region}\` is not one of regions`;
    }
    return JSON.stringify({
      regions,
      defaultRegion: raw.default_region ?? null,
      tenantContext: raw.tenant_context ?? 'jwt.tenant',
      header: raw.header ?? 'X-Tenant-Route',
    });
  },

  onHandshake(request) {
    const c = config();
    const tenant = request.context(c.tenantContext);
    if (!tenant) {
      log('info', `no ${c.tenantContext} in the context (is jwt-validate attached before this policy?)`);
      return reject(403, 'no tenant');
    }
    const asked = request.query('region');
    const region = asked ?? c.defaultRegion;
    if (!region || !c.regions.includes(region)) {
      log('info', `tenant ${tenant}: region ${JSON.stringify(asked ?? null)} refused`);
      return reject(400, `unknown region; use one of: ${c.regions.join(', ')}`);
    }
    return {
      tag: 'proceed',
      val: {
        headerChanges: [{ tag: 'set', val: { name: c.header, value: `${tenant}.${region}` } }],
        queryChanges: asked === undefined ? [] : [{ tag: 'remove', val: 'region' }],
        responseHeaders: [],
        context: [{ name: 'route.region', value: region }],
        closeAt: undefined,
        backend: undefined,
      },
    };
  },
};
