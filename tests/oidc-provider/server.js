// A real OAuth 2.0 authorization server for the access-token tests: oidc-provider,
// configured to issue RFC 9068 JWT access tokens (and opaque ones for introspection)
// carrying acr, amr and auth_time, DPoP-bound when the client sends a proof.
//
// Logins need no browser: the interaction endpoint finishes every login at once. The
// user "performs" the strongest acr the client asked for (acr_values, first value), or
// what login_hint says ("acr=VALUE"), so a test decides what a sign-in proves.
//
// Test-only: POST /test/sign {header, payload} signs with this server's own ES256 key,
// so a test can take a real token, change exactly one thing and sign it again; GET
// /test/introspected lists the SHA-256 (hex) of every token introspected here. With
// KID_PREFIX set, the server's key ids start with it (two servers with no kid in common).
//
// Usage: node server.js PORT  (the issuer names it; prints {"issuer": ...} when listening)
//
// FAPI 2.0 mode: node server.js PORT --fapi2 CLIENT.json, where CLIENT.json holds the
// gateway's registration: {"jwks": {"keys": [public JWKs]}, "redirect_uris": [...]}. The
// server then runs oidc-provider's FAPI 2.0 Security Profile (features.fapi profile
// '2.0'): pushed authorization requests required, the client authenticates with
// private_key_jwt only, tokens are DPoP-bound (with server nonces), PKCE S256, ES256 and
// PS256. Test-only: GET /test/record lists what the server saw (client assertion kid and
// aud, pushed parameters, token type and DPoP key of each token issued).
import * as crypto from 'node:crypto';
import { readFileSync } from 'node:fs';

import Provider, { errors } from 'oidc-provider';

const port = Number(process.argv[2]);
const host = '127.0.0.1';
const fapiClient = process.argv[3] === '--fapi2' ? JSON.parse(readFileSync(process.argv[4], 'utf8')) : null;

export const JWT_AUDIENCE = 'https://bank.example.com/api';
export const OTHER_AUDIENCE = 'https://other.example.com/api';
export const OPAQUE_AUDIENCE = 'https://opaque.example.com/api';

// What each acr means here, as amr values (RFC 8176).
const AMR_FOR = {
  'urn:example:loa:1': ['pwd'],
  'urn:example:loa:2': ['pwd', 'otp'],
  phr: ['hwk'],
};

function keyPair(kid, alg, options) {
  const type = alg.startsWith('ES') ? 'ec' : 'rsa';
  const { privateKey } = crypto.generateKeyPairSync(type, options);
  return { ...privateKey.export({ format: 'jwk' }), kid, alg, use: 'sig' };
}

const kidPrefix = process.env.KID_PREFIX || '';
const esKey = keyPair(`${kidPrefix}es-1`, 'ES256', { namedCurve: 'P-256' });
const rsKey = keyPair(`${kidPrefix}rs-1`, 'RS256', { modulusLength: 2048 });
const signingKey = crypto.createPrivateKey({ key: esKey, format: 'jwk' });

function resourceServer(resource) {
  if (resource === JWT_AUDIENCE || resource === OTHER_AUDIENCE) {
    return {
      scope: 'api',
      audience: resource,
      accessTokenTTL: 300,
      accessTokenFormat: 'jwt',
      jwt: { sign: { alg: 'ES256' } },
    };
  }
  if (resource === OPAQUE_AUDIENCE) {
    return { scope: 'api', audience: resource, accessTokenTTL: 300, accessTokenFormat: 'opaque' };
  }
  throw new errors.InvalidTarget();
}

const configuration = {
  clients: [
    {
      // The gateway: introspects with its own credentials (client_secret_basic).
      client_id: 'gateway',
      client_secret: 'test-client-secret',
      redirect_uris: ['http://127.0.0.1/gateway-callback'],
      grant_types: ['authorization_code'],
      response_types: ['code'],
    },
    {
      // The API client: public, PKCE, loopback redirect (RFC 8252).
      client_id: 'api-client',
      token_endpoint_auth_method: 'none',
      application_type: 'native',
      redirect_uris: ['http://127.0.0.1/cb'],
      grant_types: ['authorization_code'],
      response_types: ['code'],
    },
  ],
  jwks: { keys: [esKey, rsKey] },
  scopes: ['openid', 'api'],
  acrValues: Object.keys(AMR_FOR),
  claims: { openid: ['sub'] },
  pkce: { required: () => true },
  findAccount: (ctx, id) => ({ accountId: id, claims: () => ({ sub: id }) }),
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
  features: {
    devInteractions: { enabled: false },
    introspection: { enabled: true, allowedPolicy: async () => true },
    dPoP: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => JWT_AUDIENCE,
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, resource) => resourceServer(resource),
    },
  },
  // RFC 9470 section 4: the resource server needs acr, amr and auth_time in the token.
  extraTokenClaims: (ctx, token) => {
    if (token.kind !== 'AccessToken') return undefined;
    const source = ctx.oidc.entities.AuthorizationCode;
    if (!source) return undefined;
    return { acr: source.acr, amr: source.amr, auth_time: source.authTime };
  },
  ttl: { AccessToken: 300, AuthorizationCode: 60, IdToken: 300, Interaction: 300, Session: 600, Grant: 600 },
};

// What the FAPI 2.0 mode saw, for GET /test/record.
const record = { assertions: [], pushed: [], tokens: [] };
// What was introspected (every mode), for GET /test/introspected: token digests only.
const introspected = [];

// oidc-provider 9 docs (docs/README.md): features.fapi, features.pushedAuthorizationRequests,
// features.dPoP, features.claimsParameter, enabledJWA, clientAuthMethods, acrValues.
function fapiConfiguration(client) {
  const psKey = keyPair('ps-1', 'PS256', { modulusLength: 2048 });
  return {
    ...configuration,
    clients: [
      {
        // The gateway as a FAPI 2.0 client.
        client_id: 'gateway',
        token_endpoint_auth_method: 'private_key_jwt',
        jwks: client.jwks,
        redirect_uris: client.redirect_uris,
        grant_types: ['authorization_code'],
        response_types: ['code'],
        require_pushed_authorization_requests: true,
        dpop_bound_access_tokens: true,
        id_token_signed_response_alg: 'ES256',
      },
    ],
    jwks: { keys: [esKey, psKey] },
    scopes: ['openid', 'profile', 'email', 'api'],
    // The default claims, with amr in every ID token (the levels above password need it).
    claims: { acr: null, auth_time: null, iss: null, sid: null, openid: ['sub', 'amr'] },
    clientAuthMethods: ['private_key_jwt'],
    enabledJWA: {
      clientAuthSigningAlgValues: ['ES256', 'PS256'],
      idTokenSigningAlgValues: ['ES256', 'PS256'],
      dPoPSigningAlgValues: ['ES256', 'PS256'],
      requestObjectSigningAlgValues: ['ES256', 'PS256'],
    },
    // The default (FAPI 2.0 5.3.2.1: the assertion's aud must be the issuer), recorded.
    assertJwtClientAuthClaimsAndHeader: async (ctx, claims, header) => {
      record.assertions.push({ route: ctx.oidc.route, kid: header.kid, alg: header.alg, aud: claims.aud });
      if (ctx.oidc.isFapi('2.0') && claims.aud !== ctx.oidc.issuer) {
        throw new errors.InvalidClientAuth('audience (aud) must equal the issuer identifier url');
      }
    },
    features: {
      ...configuration.features,
      fapi: { enabled: true, profile: '2.0' },
      pushedAuthorizationRequests: { enabled: true, requirePushedAuthorizationRequests: true },
      // RFC 9449 8: every proof must carry a nonce this server handed out.
      dPoP: { enabled: true, nonceSecret: crypto.randomBytes(32), requireNonce: () => true },
      claimsParameter: { enabled: true },
      introspection: { enabled: false },
    },
  };
}

// The several-providers tests sign in at this server through the gateway: with
// GATEWAY_REDIRECT_URI set, the gateway is also registered as a relying party (web,
// client_secret_basic) with that redirect URI. Unset (the default), nothing changes.
if (process.env.GATEWAY_REDIRECT_URI) {
  configuration.clients.push({
    client_id: 'gateway-rp',
    client_secret: 'test-client-secret',
    redirect_uris: [process.env.GATEWAY_REDIRECT_URI],
    post_logout_redirect_uris: process.env.GATEWAY_LOGGED_OUT_URI ? [process.env.GATEWAY_LOGGED_OUT_URI] : [],
    grant_types: ['authorization_code'],
    response_types: ['code'],
  });
}

const provider = new Provider(
  `http://${host}:${port}`,
  fapiClient ? fapiConfiguration(fapiClient) : configuration,
);

if (fapiClient) {
  provider.on('pushed_authorization_request.success', (ctx) => {
    const { params } = ctx.oidc;
    record.pushed.push({
      acr_values: params.acr_values,
      claims: params.claims,
      max_age: params.max_age,
      code_challenge_method: params.code_challenge_method,
      redirect_uri: params.redirect_uri,
    });
  });
  provider.on('grant.success', (ctx) => {
    const token = ctx.oidc.entities.AccessToken;
    record.tokens.push({ token_type: ctx.body.token_type, jkt: token?.jkt });
  });
}

// The acr the user "performs": acr_values (first value), or the essential acr of the
// claims parameter (FAPI 2.0 mode), or login_hint "acr=VALUE".
function askedAcr(params) {
  const asked = String(params.acr_values || '').split(' ').filter(Boolean);
  if (!asked.length && fapiClient && params.claims) {
    const acr = JSON.parse(String(params.claims)).id_token?.acr;
    if (acr?.value) asked.push(acr.value);
    if (Array.isArray(acr?.values)) asked.push(...acr.values);
  }
  return asked;
}

async function finishLogin(ctx) {
  const details = await provider.interactionDetails(ctx.req, ctx.res);
  const { params } = details;
  if (process.env.AUTHZ_DEBUG) console.error(JSON.stringify(details.prompt), JSON.stringify(params));
  const hint = String(params.login_hint || '');
  const asked = askedAcr(params);
  let acr = asked[0] || 'urn:example:loa:1';
  if (hint.startsWith('acr=')) acr = hint.slice(4);
  const accountId = 'alice';
  const grant = new provider.Grant({ accountId, clientId: params.client_id });
  grant.addOIDCScope(String(params.scope || 'openid'));
  const resources = params.resource ? [].concat(params.resource) : [JWT_AUDIENCE];
  for (const resource of resources) grant.addResourceScope(resource, 'api');
  const grantId = await grant.save();
  const returnTo = await provider.interactionResult(
    ctx.req,
    ctx.res,
    { login: { accountId, acr, amr: AMR_FOR[acr] || ['pwd'] }, consent: { grantId } },
    { mergeWithLastSubmission: false },
  );
  ctx.status = 303;
  ctx.redirect(returnTo);
}

function b64url(value) {
  return Buffer.from(typeof value === 'string' ? value : JSON.stringify(value)).toString('base64url');
}

async function readJson(ctx) {
  const chunks = [];
  for await (const chunk of ctx.req) chunks.push(chunk);
  return JSON.parse(Buffer.concat(chunks).toString('utf8'));
}

provider.use(async (ctx, next) => {
  if (ctx.method === 'GET' && /^\/interaction\/[^/]+$/.test(ctx.path)) {
    await finishLogin(ctx);
    return;
  }
  if (ctx.method === 'POST' && ctx.path === '/test/sign') {
    const { header, payload } = await readJson(ctx);
    const input = `${b64url({ alg: 'ES256', kid: esKey.kid, ...header })}.${b64url(payload)}`;
    const signature = crypto.sign('sha256', Buffer.from(input), { key: signingKey, dsaEncoding: 'ieee-p1363' });
    ctx.type = 'text/plain';
    ctx.body = `${input}.${signature.toString('base64url')}`;
    return;
  }
  if (fapiClient && ctx.method === 'GET' && ctx.path === '/test/record') {
    ctx.body = record;
    return;
  }
  if (ctx.method === 'GET' && ctx.path === '/test/introspected') {
    ctx.body = introspected;
    return;
  }
  await next();
  if (ctx.oidc?.route === 'introspection' && ctx.oidc.params?.token) {
    introspected.push(crypto.createHash('sha256').update(String(ctx.oidc.params.token)).digest('hex'));
  }
});

const server = provider.listen(port, host, () => {
  process.stdout.write(`${JSON.stringify({ issuer: provider.issuer })}\n`);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
